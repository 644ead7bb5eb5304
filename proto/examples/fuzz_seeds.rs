//! Writes seed frames for the fuzz corpus: `cargo run -p gantry-proto --example fuzz_seeds -- DIR`.
//! Files named `valid-*` hold well-formed frames; the corpus test checks they decode.

use gantry_proto::*;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let dir = std::env::args().nth(1).ok_or("usage: fuzz_seeds DIR")?;
    let seeds = [
        (
            "valid-hello",
            Message::Hello(Hello::new("gantry-agent 0.1.0")),
        ),
        (
            "valid-guest-info",
            Message::Request(Request {
                id: 1,
                op: Op::GuestInfo,
            }),
        ),
        (
            "valid-ping",
            Message::Request(Request {
                id: 2,
                op: Op::Ping {
                    payload: b"ping".to_vec(),
                },
            }),
        ),
        (
            "valid-reply",
            Message::Response(Response {
                id: 1,
                result: Ok(Reply::GuestInfo(GuestInfo {
                    kernel_release: "6.1.0-56-amd64".into(),
                    cpus: 1,
                    memory_total_bytes: 512 << 20,
                    shim_version: "0.1.0".into(),
                    uptime_ms: 4000,
                    shim_ready_uptime_ms: 3000,
                })),
            }),
        ),
        (
            "valid-error",
            Message::Response(Response {
                id: 3,
                result: Err(ErrorReply {
                    kind: ErrorKind::NotFound,
                    message: "no such container".into(),
                }),
            }),
        ),
        (
            "valid-output",
            Message::Event(Event::Output {
                container_id: "c1".into(),
                exec_id: None,
                stream: OutputStream::Stdout,
                data: b"hello\n".to_vec(),
            }),
        ),
        (
            "valid-goodbye",
            Message::Goodbye {
                reason: "bye".into(),
            },
        ),
    ];
    for (name, message) in seeds {
        std::fs::write(
            format!("{dir}/{name}"),
            encode_frame(&message, DEFAULT_MAX_FRAME_LEN)?,
        )?;
    }
    Ok(())
}
