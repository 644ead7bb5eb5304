//! Property and edge-case tests of frames and messages.

use std::io::Cursor;

use bytes::BytesMut;
use proptest::prelude::*;
use tokio_util::codec::{Decoder, Encoder};

use crate::*;

fn frame_of(message: &Message) -> Vec<u8> {
    encode_frame(message, DEFAULT_MAX_FRAME_LEN).expect("encodes")
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn every_message_round_trips_through_the_blocking_codec(message in any::<Message>()) {
        let frame = frame_of(&message);
        let mut cursor = Cursor::new(frame);
        prop_assert_eq!(read_frame(&mut cursor, DEFAULT_MAX_FRAME_LEN).unwrap(), Some(message));
        prop_assert_eq!(read_frame(&mut cursor, DEFAULT_MAX_FRAME_LEN).unwrap(), None);
    }

    #[test]
    fn every_message_round_trips_through_the_tokio_codec(messages in proptest::collection::vec(any::<Message>(), 1..5)) {
        let mut codec = FrameCodec::default();
        let mut buffer = BytesMut::new();
        for message in &messages {
            codec.encode(message, &mut buffer).unwrap();
        }
        let mut decoded = Vec::new();
        while let Some(message) = codec.decode(&mut buffer).unwrap() {
            decoded.push(message);
        }
        prop_assert!(buffer.is_empty());
        prop_assert_eq!(decoded, messages);
    }

    #[test]
    fn every_strict_prefix_is_truncated_never_a_message(message in any::<Message>(), cut in any::<prop::sample::Index>()) {
        let frame = frame_of(&message);
        let cut = cut.index(frame.len());
        let mut cursor = Cursor::new(&frame[..cut]);
        match read_frame(&mut cursor, DEFAULT_MAX_FRAME_LEN) {
            Ok(None) => prop_assert_eq!(cut, 0),
            Err(FrameError::Truncated { got, .. }) => prop_assert!(got < frame.len()),
            other => prop_assert!(false, "prefix of {} bytes gave {:?}", cut, other),
        }
        let mut buffer = BytesMut::from(&frame[..cut]);
        prop_assert_eq!(FrameCodec::default().decode(&mut buffer).unwrap(), None);
        if cut > 0 {
            let is_truncated = matches!(FrameCodec::default().decode_eof(&mut buffer), Err(FrameError::Truncated { .. }));
            prop_assert!(is_truncated);
        }
    }

    #[test]
    fn garbage_never_panics_and_both_decoders_agree(data in proptest::collection::vec(any::<u8>(), 0..512)) {
        crate::fuzzing::check_frame_bytes(&data).unwrap();
    }

    #[test]
    fn garbage_payload_behind_a_valid_header_never_panics(payload in proptest::collection::vec(any::<u8>(), 0..256)) {
        let mut data = (payload.len() as u32).to_le_bytes().to_vec();
        data.extend_from_slice(&payload);
        crate::fuzzing::check_frame_bytes(&data).unwrap();
    }
}

#[test]
fn a_length_over_the_limit_is_refused_before_reading_the_payload() {
    struct HeaderThenPoison {
        header: Cursor<[u8; 4]>,
    }
    impl std::io::Read for HeaderThenPoison {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            let n = std::io::Read::read(&mut self.header, buf)?;
            assert!(n > 0, "the payload of an oversized frame must not be read");
            Ok(n)
        }
    }
    let mut reader = HeaderThenPoison {
        header: Cursor::new(u32::MAX.to_le_bytes()),
    };
    match read_frame(&mut reader, DEFAULT_MAX_FRAME_LEN) {
        Err(FrameError::TooLarge { len, max }) => {
            assert_eq!(len, u64::from(u32::MAX));
            assert_eq!(max, DEFAULT_MAX_FRAME_LEN);
        }
        other => panic!("expected TooLarge, got {other:?}"),
    }
    let mut buffer = BytesMut::from(&(DEFAULT_MAX_FRAME_LEN + 1).to_le_bytes()[..]);
    assert!(matches!(
        FrameCodec::default().decode(&mut buffer),
        Err(FrameError::TooLarge { .. })
    ));
}

#[test]
fn a_smaller_configured_limit_is_enforced_both_ways() {
    let message = Message::Request(Request {
        id: 1,
        op: Op::Ping {
            payload: vec![7; 100],
        },
    });
    assert!(matches!(
        encode_frame(&message, 50),
        Err(FrameError::TooLarge { .. })
    ));
    let frame = frame_of(&message);
    assert!(matches!(
        read_frame(&mut Cursor::new(&frame), 50),
        Err(FrameError::TooLarge { max: 50, .. })
    ));
}

#[test]
fn limits_above_the_cap_are_clamped() {
    assert_eq!(FrameCodec::new(u32::MAX).max_len(), MAX_FRAME_LEN_CAP);
}

#[test]
fn trailing_bytes_inside_a_payload_are_an_error() {
    let frame = frame_of(&Message::Request(Request {
        id: 9,
        op: Op::GuestInfo,
    }));
    let mut payload = frame[FRAME_HEADER_LEN..].to_vec();
    payload.push(0);
    assert!(matches!(
        decode_payload(&payload),
        Err(FrameError::TrailingBytes { extra: 1 })
    ));
}

#[test]
fn an_unknown_variant_is_a_decode_error() {
    // Message variant index 200 does not exist.
    let payload = 200u32.to_le_bytes();
    assert!(matches!(
        decode_payload(&payload),
        Err(FrameError::Decode(_))
    ));
}

#[test]
fn a_hostile_inner_length_is_a_decode_error() {
    // Goodbye { reason } whose string claims u64::MAX bytes.
    let mut payload = 4u32.to_le_bytes().to_vec();
    payload.extend_from_slice(&u64::MAX.to_le_bytes());
    assert!(matches!(
        decode_payload(&payload),
        Err(FrameError::Decode(_))
    ));
}

#[test]
fn the_wire_format_is_little_endian_fixint() {
    // The frame layout is a contract with other implementations: pin it down.
    let frame = frame_of(&Message::Request(Request {
        id: 0x0102,
        op: Op::GuestInfo,
    }));
    let expected: Vec<u8> = [
        &16u32.to_le_bytes()[..],     // payload length
        &1u32.to_le_bytes()[..],      // Message::Request
        &0x0102u64.to_le_bytes()[..], // id
        &0u32.to_le_bytes()[..],      // Op::GuestInfo
    ]
    .concat();
    assert_eq!(frame, expected);
}

#[tokio::test]
async fn frames_cross_a_real_stream_split_at_every_byte() {
    use futures::{SinkExt, StreamExt};
    use tokio::io::AsyncWriteExt;
    use tokio_util::codec::FramedRead;

    let messages = vec![
        Message::Hello(Hello::new("test 1")),
        Message::Request(Request {
            id: 1,
            op: Op::Ping {
                payload: vec![1, 2, 3],
            },
        }),
        Message::Goodbye {
            reason: "done".into(),
        },
    ];
    let bytes: Vec<u8> = messages.iter().flat_map(frame_of).collect();
    let (mut writer, reader) = tokio::io::duplex(3);
    let writer_task = tokio::spawn(async move {
        for byte in bytes {
            writer.write_all(&[byte]).await.unwrap();
        }
    });
    let decoded: Vec<Message> = FramedRead::new(reader, FrameCodec::default())
        .map(|m| m.unwrap())
        .collect()
        .await;
    writer_task.await.unwrap();
    assert_eq!(decoded, messages);

    // And the sink side writes the same bytes the blocking encoder does.
    let (writer, mut reader) = tokio::io::duplex(1 << 16);
    let mut sink = tokio_util::codec::FramedWrite::new(writer, FrameCodec::default());
    sink.send(messages[1].clone()).await.unwrap();
    drop(sink);
    let mut written = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut reader, &mut written)
        .await
        .unwrap();
    assert_eq!(written, frame_of(&messages[1]));
}

#[test]
fn tty_operations_round_trip_with_their_appended_variant_indices() {
    let size = TtySize {
        rows: 40,
        cols: 132,
    };
    let resize = Message::Request(Request {
        id: 7,
        op: Op::ResizeTty {
            container_id: "c".into(),
            exec_id: Some("e".into()),
            size,
        },
    });
    let frame = frame_of(&resize);
    assert_eq!(decode_payload(&frame[4..]).unwrap(), resize);
    // Appended after SubscribeEvents (15): CreateContainerTty 16, ExecTty 17, ResizeTty 18.
    assert_eq!(&frame[16..20], &18u32.to_le_bytes());
    let exec = Message::Request(Request {
        id: 8,
        op: Op::ExecTty {
            container_id: "c".into(),
            exec_id: "e".into(),
            process: ProcessSpec {
                args: vec!["sh".into()],
                env: vec![],
                cwd: "/".into(),
                user: String::new(),
                stdin: true,
            },
            size,
        },
    });
    let frame = frame_of(&exec);
    assert_eq!(&frame[16..20], &17u32.to_le_bytes());
    assert_eq!(decode_payload(&frame[4..]).unwrap(), exec);
}

#[test]
fn a_1_1_exec_frame_still_decodes_unchanged() {
    // Protocol 1.2 added operations, not fields: a 1.1 agent's `Exec` is byte for byte the same.
    let exec = Message::Request(Request {
        id: 1,
        op: Op::Exec {
            container_id: "c".into(),
            exec_id: "e".into(),
            process: ProcessSpec {
                args: vec!["true".into()],
                env: vec![],
                cwd: "/".into(),
                user: String::new(),
                stdin: false,
            },
        },
    });
    let str_field = |s: &str| [&(s.len() as u64).to_le_bytes()[..], s.as_bytes()].concat();
    let payload: Vec<u8> = [
        &1u32.to_le_bytes()[..], // Message::Request
        &1u64.to_le_bytes()[..], // id
        &4u32.to_le_bytes()[..], // Op::Exec
        &str_field("c"),
        &str_field("e"),
        &1u64.to_le_bytes()[..], // args
        &str_field("true"),
        &0u64.to_le_bytes()[..], // env
        &str_field("/"),
        &str_field(""),
        &[0u8][..], // stdin
    ]
    .concat();
    assert_eq!(decode_payload(&payload).unwrap(), exec);
}

#[test]
fn tty_operations_require_protocol_1_2() {
    let resize = Op::ResizeTty {
        container_id: "c".into(),
        exec_id: None,
        size: TtySize::default(),
    };
    assert_eq!(resize.required_version(), TTY_OPERATIONS);
    assert_eq!(TTY_OPERATIONS, ProtocolVersion { major: 1, minor: 2 });
    assert!(PROTOCOL_VERSION >= TTY_OPERATIONS);
    assert_eq!(
        Op::SubscribeEvents.required_version(),
        EVENTS_BY_SUBSCRIPTION
    );
    assert_eq!(
        Op::GuestInfo.required_version(),
        ProtocolVersion { major: 1, minor: 0 }
    );
}

#[test]
fn resumable_output_is_protocol_1_3_and_appended() {
    let subscribe = Op::SubscribeEventsFrom {
        positions: vec![OutputPosition {
            container_id: "c".into(),
            exec_id: None,
            position: 5,
        }],
    };
    let received = Op::OutputReceived {
        container_id: "c".into(),
        exec_id: Some("e".into()),
        position: 9,
    };
    for op in [&subscribe, &received] {
        assert_eq!(op.required_version(), RESUMABLE_OUTPUT);
    }
    assert_eq!(RESUMABLE_OUTPUT, ProtocolVersion { major: 1, minor: 3 });
    assert!(PROTOCOL_VERSION >= RESUMABLE_OUTPUT);
    // Appended after ResizeTty (18): SubscribeEventsFrom 19, OutputReceived 20.
    for (op, index) in [(subscribe, 19u32), (received, 20)] {
        let message = Message::Request(Request { id: 3, op });
        let frame = frame_of(&message);
        assert_eq!(&frame[16..20], &index.to_le_bytes());
        assert_eq!(decode_payload(&frame[4..]).unwrap(), message);
    }
    // Appended after Oom (2): OutputAt 3; a 1.2 peer's `Output` is unchanged (0).
    let event = Message::Event(Event::OutputAt {
        container_id: "c".into(),
        exec_id: None,
        stream: OutputStream::Stderr,
        offset: 1 << 40,
        data: b"x".to_vec(),
    });
    let frame = frame_of(&event);
    assert_eq!(&frame[8..12], &3u32.to_le_bytes());
    assert_eq!(decode_payload(&frame[4..]).unwrap(), event);
}
