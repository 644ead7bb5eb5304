//! The vsock listener and the per-connection protocol loop.
//!
//! The shim listens on [`gantry_proto::SHIM_VSOCK_PORT`]; the agent connects (again after either
//! side restarts). On each connection the shim sends its `Hello` first, reads the agent's `Hello`,
//! refuses a different major version with a `Goodbye` naming both, then answers `Request`s
//! concurrently, in whatever order they complete.
//!
//! Everything the agent sends is untrusted: a frame that does not decode, or a message that makes
//! no sense at that point, ends that connection (with a `Goodbye` saying why when the transport
//! still works). The listener and every other connection carry on.

use std::sync::Arc;

use futures::{SinkExt, StreamExt};
use gantry_proto::{
    DEFAULT_MAX_FRAME_LEN, ErrorKind, ErrorReply, FrameCodec, FrameError, GuestInfo, Hello,
    Message, Op, PROTOCOL_VERSION, Reply, Request, Response, negotiate,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{Semaphore, mpsc};

use crate::container::Runtime;
use tokio_util::codec::{FramedRead, FramedWrite};
use tokio_vsock::{VMADDR_CID_ANY, VsockAddr, VsockListener};

use crate::guest_info;

/// Requests of one connection being executed at the same time; further frames are not read until
/// one finishes, so a flooding agent meets back-pressure instead of growing the shim's memory.
const MAX_IN_FLIGHT_REQUESTS: usize = 64;
/// Outgoing messages queued for the writer of one connection.
const OUTGOING_QUEUE_LEN: usize = 64;

/// Errors of the listener (fatal for the server).
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The vsock port could not be bound (no vsock transport, or the port is taken).
    #[error("cannot listen on vsock port {port}: {source}")]
    Bind {
        /// The port.
        port: u32,
        /// Why.
        source: std::io::Error,
    },
}

/// Why a connection ended abnormally.
#[derive(Debug, thiserror::Error)]
pub enum ConnectionError {
    /// Reading or writing frames failed (including frames that do not decode).
    #[error("frame error: {0}")]
    Frame(#[from] FrameError),
    /// The agent closed the connection before sending its `Hello`.
    #[error("peer closed the connection before its Hello")]
    ClosedBeforeHello,
    /// The agent broke the protocol (version mismatch, unexpected message).
    #[error("protocol violation: {0}")]
    Protocol(String),
}

/// Configuration of the server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The vsock port to listen on.
    pub port: u32,
    /// Largest frame payload accepted or sent.
    pub max_frame_len: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            port: gantry_proto::SHIM_VSOCK_PORT,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
        }
    }
}

/// State shared by all connections.
#[derive(Debug, Clone)]
pub struct ShimState {
    /// Guest uptime when the listener was ready, in milliseconds.
    pub ready_uptime_ms: u64,
    /// Largest frame payload accepted or sent.
    pub max_frame_len: u32,
    /// The containers, which outlive connections.
    pub runtime: Arc<Runtime>,
}

/// The shim's software version as announced in its `Hello`.
pub fn software_version() -> String {
    format!("gantry-shim {}", env!("CARGO_PKG_VERSION"))
}

/// Binds the vsock port and serves connections until the listener itself fails.
///
/// Returns only on a fatal error: a failing `accept` is logged and retried.
pub async fn run(
    config: ServerConfig,
    runtime: Arc<Runtime>,
) -> Result<std::convert::Infallible, ServerError> {
    let listener =
        VsockListener::bind(VsockAddr::new(VMADDR_CID_ANY, config.port)).map_err(|source| {
            ServerError::Bind {
                port: config.port,
                source,
            }
        })?;
    let ready_uptime_ms = guest_info::collect()
        .map(|facts| facts.uptime_ms)
        .unwrap_or(0);
    tracing::info!(
        port = config.port,
        uptime_ms = ready_uptime_ms,
        "listening on vsock"
    );
    let state = Arc::new(ShimState {
        ready_uptime_ms,
        max_frame_len: config.max_frame_len,
        runtime,
    });
    loop {
        match listener.accept().await {
            Ok((stream, peer)) => {
                tracing::info!(cid = peer.cid(), port = peer.port(), "agent connected");
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    match serve_connection(stream, state).await {
                        Ok(()) => tracing::info!(
                            cid = peer.cid(),
                            port = peer.port(),
                            "connection closed"
                        ),
                        Err(error) => tracing::warn!(
                            cid = peer.cid(),
                            port = peer.port(),
                            %error,
                            "connection ended"
                        ),
                    }
                });
            }
            Err(error) => {
                // EMFILE, ENOMEM, a connection reset before accept: transient; do not spin.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        }
    }
}

/// Speaks the protocol on one connection until the agent closes it or breaks the protocol.
pub async fn serve_connection<S>(io: S, state: Arc<ShimState>) -> Result<(), ConnectionError>
where
    S: AsyncRead + AsyncWrite + Send + 'static,
{
    let codec = FrameCodec::new(state.max_frame_len);
    let (reader, writer) = tokio::io::split(io);
    let mut frames_in = FramedRead::new(reader, codec);
    let mut frames_out = FramedWrite::new(writer, codec);

    frames_out
        .send(Message::Hello(Hello::new(software_version())))
        .await?;

    let peer_hello = match frames_in.next().await {
        None => return Err(ConnectionError::ClosedBeforeHello),
        Some(Err(error)) => {
            say_goodbye(&mut frames_out, format!("cannot read your Hello: {error}")).await;
            return Err(error.into());
        }
        Some(Ok(Message::Hello(hello))) => hello,
        Some(Ok(other)) => {
            let reason = format!("expected Hello, got {}", other.kind());
            say_goodbye(&mut frames_out, reason.clone()).await;
            return Err(ConnectionError::Protocol(reason));
        }
    };
    if let Err(mismatch) = negotiate(PROTOCOL_VERSION, &peer_hello) {
        let reason = mismatch.to_string();
        say_goodbye(&mut frames_out, reason.clone()).await;
        return Err(ConnectionError::Protocol(reason));
    }
    tracing::info!(
        peer_software = %peer_hello.software_version,
        peer_protocol = %peer_hello.protocol_version,
        "handshake done"
    );

    let (outgoing, mut outgoing_rx) = mpsc::channel::<Message>(OUTGOING_QUEUE_LEN);
    let writer_task = tokio::spawn(async move {
        while let Some(message) = outgoing_rx.recv().await {
            frames_out.send(message).await?;
        }
        Ok::<(), FrameError>(())
    });

    // Events (output, exits) go to the connection that asks for them (`SubscribeEvents`, from
    // protocol 1.1 on; `SubscribeEventsFrom`, which loses no output, from 1.3 on) or, for an
    // older agent, to the newest connection (see `EventSink::subscribe`).
    let mut sink_generation = None;
    if peer_hello.protocol_version < gantry_proto::EVENTS_BY_SUBSCRIPTION {
        sink_generation = Some(state.runtime.sink().subscribe(outgoing.clone(), None).await);
    }

    let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT_REQUESTS));
    let outcome = loop {
        let Ok(permit) = Arc::clone(&in_flight).acquire_owned().await else {
            break Ok(());
        };
        let message = match frames_in.next().await {
            None => break Ok(()),
            Some(Ok(message)) => message,
            Some(Err(error)) => {
                let reason = format!("bad frame: {error}");
                tracing::warn!(%reason, "closing connection");
                let _ = outgoing.send(Message::Goodbye { reason }).await;
                break Err(ConnectionError::Frame(error));
            }
        };
        match message {
            Message::Request(Request {
                id,
                op: op @ (Op::SubscribeEvents | Op::SubscribeEventsFrom { .. }),
            }) => {
                // A second subscription on the same connection changes nothing: its events
                // already come here.
                if sink_generation.is_none() {
                    let positions = match op {
                        Op::SubscribeEventsFrom { positions } => Some(positions),
                        _ => None,
                    };
                    let sink = state.runtime.sink();
                    sink_generation = Some(sink.subscribe(outgoing.clone(), positions).await);
                }
                let response = Response {
                    id,
                    result: Ok(Reply::Done),
                };
                let _ = outgoing.send(Message::Response(response)).await;
                drop(permit);
            }
            Message::Request(request) => {
                let outgoing = outgoing.clone();
                let state = Arc::clone(&state);
                tokio::spawn(async move {
                    let response = execute(request, &state).await;
                    // The writer is gone only if the connection is: nobody to answer.
                    let _ = outgoing.send(Message::Response(response)).await;
                    drop(permit);
                });
            }
            Message::Goodbye { reason } => {
                tracing::info!(%reason, "agent said goodbye");
                break Ok(());
            }
            other => {
                let reason = format!("unexpected {} from the agent", other.kind());
                let _ = outgoing
                    .send(Message::Goodbye {
                        reason: reason.clone(),
                    })
                    .await;
                break Err(ConnectionError::Protocol(reason));
            }
        }
    };

    // Let requests still running answer, then flush: the writer ends when every sender is gone.
    if let Some(generation) = sink_generation {
        state.runtime.sink().detach(generation);
    }
    drop(outgoing);
    match writer_task.await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            if outcome.is_ok() {
                return Err(error.into());
            }
        }
        Err(join_error) => tracing::error!(%join_error, "connection writer failed"),
    }
    outcome
}

/// Sends a `Goodbye` on a best-effort basis: the connection is being closed anyway.
async fn say_goodbye<W>(frames_out: &mut FramedWrite<W, FrameCodec>, reason: String)
where
    W: AsyncWrite + Unpin,
{
    tracing::warn!(%reason, "refusing connection");
    if let Err(error) = frames_out.send(Message::Goodbye { reason }).await {
        tracing::debug!(%error, "could not send Goodbye");
    }
}

/// Executes one request.
async fn execute(request: Request, state: &ShimState) -> Response {
    let result = match request.op {
        Op::GuestInfo => guest_info_reply(state),
        Op::Ping { payload } => Ok(Reply::Pong { payload }),
        container_op => state.runtime.handle(container_op).await.unwrap_or_else(|| {
            Err(ErrorReply {
                kind: ErrorKind::Unsupported,
                message: "operation not supported by this shim".into(),
            })
        }),
    };
    Response {
        id: request.id,
        result,
    }
}

fn guest_info_reply(state: &ShimState) -> Result<Reply, ErrorReply> {
    let facts = guest_info::collect().map_err(|error| ErrorReply {
        kind: ErrorKind::Internal,
        message: error.to_string(),
    })?;
    Ok(Reply::GuestInfo(GuestInfo {
        kernel_release: facts.kernel_release,
        cpus: facts.cpu_count,
        memory_total_bytes: facts.memory_total_bytes,
        shim_version: facts.shim_version,
        uptime_ms: facts.uptime_ms,
        shim_ready_uptime_ms: state.ready_uptime_ms,
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_proto::ProtocolVersion;
    use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
    use tokio_util::codec::Framed;

    type AgentSide = Framed<DuplexStream, FrameCodec>;

    fn state() -> Arc<ShimState> {
        Arc::new(ShimState {
            ready_uptime_ms: 1234,
            max_frame_len: DEFAULT_MAX_FRAME_LEN,
            runtime: Runtime::new(
                Arc::new(crate::reaper::Reaper::default()),
                crate::container::cgroup::CgroupTree::unprepared(std::env::temp_dir()),
            ),
        })
    }

    /// Starts a shim connection; returns the agent's end and the shim's task.
    fn connect() -> (
        AgentSide,
        tokio::task::JoinHandle<Result<(), ConnectionError>>,
    ) {
        connect_to(&state())
    }

    /// Starts a connection to the shim of `state` (connections after an agent restart).
    fn connect_to(
        state: &Arc<ShimState>,
    ) -> (
        AgentSide,
        tokio::task::JoinHandle<Result<(), ConnectionError>>,
    ) {
        let (agent, shim) = tokio::io::duplex(64 * 1024);
        let task = tokio::spawn(serve_connection(shim, Arc::clone(state)));
        (Framed::new(agent, FrameCodec::default()), task)
    }

    async fn next(agent: &mut AgentSide) -> Message {
        tokio::time::timeout(std::time::Duration::from_secs(5), agent.next())
            .await
            .expect("shim answers within 5 s")
            .expect("stream open")
            .expect("frame decodes")
    }

    async fn handshake(agent: &mut AgentSide) {
        let Message::Hello(hello) = next(agent).await else {
            panic!("the shim speaks first with a Hello");
        };
        assert_eq!(hello.protocol_version, PROTOCOL_VERSION);
        assert!(hello.software_version.starts_with("gantry-shim "));
        agent
            .send(Message::Hello(Hello::new("test-agent")))
            .await
            .expect("send Hello");
    }

    #[tokio::test]
    async fn answers_guest_info_and_ping() {
        let (mut agent, task) = connect();
        handshake(&mut agent).await;
        agent
            .send(Message::Request(Request {
                id: 1,
                op: Op::GuestInfo,
            }))
            .await
            .expect("send");
        let Message::Response(response) = next(&mut agent).await else {
            panic!("expected a Response");
        };
        assert_eq!(response.id, 1);
        let Ok(Reply::GuestInfo(info)) = response.result else {
            panic!("expected GuestInfo, got {:?}", response.result);
        };
        assert_eq!(info.shim_version, env!("CARGO_PKG_VERSION"));
        assert_eq!(info.shim_ready_uptime_ms, 1234);
        assert!(info.cpus >= 1);
        assert!(info.memory_total_bytes > 0);

        agent
            .send(Message::Request(Request {
                id: 2,
                op: Op::Ping {
                    payload: b"abc".to_vec(),
                },
            }))
            .await
            .expect("send");
        assert_eq!(
            next(&mut agent).await,
            Message::Response(Response {
                id: 2,
                result: Ok(Reply::Pong {
                    payload: b"abc".to_vec()
                }),
            })
        );

        drop(agent);
        let outcome = task.await.expect("task");
        assert!(outcome.is_ok(), "{outcome:?}");
    }

    #[tokio::test]
    async fn many_requests_are_all_answered() {
        let (mut agent, task) = connect();
        handshake(&mut agent).await;
        for id in 0..200u64 {
            agent
                .send(Message::Request(Request {
                    id,
                    op: Op::Ping {
                        payload: id.to_le_bytes().to_vec(),
                    },
                }))
                .await
                .expect("send");
        }
        let mut seen = std::collections::BTreeSet::new();
        for _ in 0..200 {
            let Message::Response(Response {
                id,
                result: Ok(Reply::Pong { payload }),
            }) = next(&mut agent).await
            else {
                panic!("expected a Pong");
            };
            assert_eq!(payload, id.to_le_bytes());
            seen.insert(id);
        }
        assert_eq!(seen.len(), 200);
        drop(agent);
        assert!(task.await.expect("task").is_ok());
    }

    #[tokio::test]
    async fn major_version_mismatch_gets_a_goodbye_naming_both_versions() {
        let (mut agent, task) = connect();
        let _shim_hello = next(&mut agent).await;
        let mut hello = Hello::new("future-agent 9.0");
        hello.protocol_version = ProtocolVersion {
            major: PROTOCOL_VERSION.major + 1,
            minor: 3,
        };
        agent.send(Message::Hello(hello)).await.expect("send");
        let Message::Goodbye { reason } = next(&mut agent).await else {
            panic!("expected Goodbye");
        };
        assert!(reason.contains(&PROTOCOL_VERSION.to_string()), "{reason}");
        assert!(
            reason.contains(&format!("{}.3", PROTOCOL_VERSION.major + 1)),
            "{reason}"
        );
        assert!(matches!(
            task.await.expect("task"),
            Err(ConnectionError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn request_before_hello_is_refused() {
        let (mut agent, task) = connect();
        let _shim_hello = next(&mut agent).await;
        agent
            .send(Message::Request(Request {
                id: 1,
                op: Op::GuestInfo,
            }))
            .await
            .expect("send");
        let Message::Goodbye { reason } = next(&mut agent).await else {
            panic!("expected Goodbye");
        };
        assert!(reason.contains("expected Hello"), "{reason}");
        assert!(task.await.expect("task").is_err());
    }

    #[tokio::test]
    async fn garbage_frame_ends_the_connection_with_a_goodbye() {
        let (agent, task) = connect();
        let mut agent = agent;
        handshake(&mut agent).await;
        let mut raw = agent.into_inner();
        // A well-sized frame whose payload is an invalid Message variant index.
        raw.write_all(&8u32.to_le_bytes()).await.expect("header");
        raw.write_all(&[0xff; 8]).await.expect("payload");
        let mut agent = Framed::new(raw, FrameCodec::default());
        let Message::Goodbye { reason } = next(&mut agent).await else {
            panic!("expected Goodbye");
        };
        assert!(reason.contains("bad frame"), "{reason}");
        assert!(matches!(
            task.await.expect("task"),
            Err(ConnectionError::Frame(_))
        ));
    }

    #[tokio::test]
    async fn oversized_frame_is_refused_without_reading_it() {
        let (agent, task) = connect();
        let mut agent = agent;
        handshake(&mut agent).await;
        let mut raw = agent.into_inner();
        raw.write_all(&u32::MAX.to_le_bytes())
            .await
            .expect("header");
        let mut agent = Framed::new(raw, FrameCodec::default());
        let Message::Goodbye { reason } = next(&mut agent).await else {
            panic!("expected Goodbye");
        };
        assert!(reason.contains("exceeds"), "{reason}");
        assert!(task.await.expect("task").is_err());
    }

    #[tokio::test]
    async fn peer_closing_before_hello_is_reported() {
        let (agent, shim) = tokio::io::duplex(1024);
        let task = tokio::spawn(serve_connection(shim, state()));
        let mut agent = agent;
        let mut buf = [0u8; 256];
        let read = agent.read(&mut buf).await.expect("read shim hello");
        assert!(read > 4);
        drop(agent);
        assert!(matches!(
            task.await.expect("task"),
            Err(ConnectionError::ClosedBeforeHello)
        ));
    }

    /// A process of no container: its stdout pumped into the shim's sink as a container's
    /// would be; its window, the process's end of the pipe, the pump.
    fn spawn_process(
        state: &ShimState,
        container_id: &str,
    ) -> (
        Arc<crate::container::io::OutputWindow>,
        std::fs::File,
        tokio::task::JoinHandle<()>,
    ) {
        let sink = state.runtime.sink();
        let window = sink.window(crate::container::io::ProcessKey {
            container_id: container_id.into(),
            exec_id: None,
        });
        let (read, write) = crate::container::launch::pipe().expect("pipe");
        let pump = tokio::spawn(crate::container::io::pump(
            read,
            gantry_proto::OutputStream::Stdout,
            Arc::clone(&window),
            Arc::clone(sink),
        ));
        (window, std::fs::File::from(write), pump)
    }

    async fn write(mut file: std::fs::File, data: &'static [u8]) -> std::fs::File {
        tokio::task::spawn_blocking(move || {
            std::io::Write::write_all(&mut file, data).expect("write");
            file
        })
        .await
        .expect("writer")
    }

    async fn handshake_as(agent: &mut AgentSide, protocol_version: ProtocolVersion) {
        let Message::Hello(_) = next(agent).await else {
            panic!("the shim speaks first with a Hello");
        };
        let mut hello = Hello::new("test-agent");
        hello.protocol_version = protocol_version;
        agent.send(Message::Hello(hello)).await.expect("send Hello");
    }

    async fn request(agent: &mut AgentSide, id: u64, op: Op) {
        agent
            .send(Message::Request(Request { id, op }))
            .await
            .expect("send");
    }

    /// Reads events until the response to `id`, which is `Done`; the events.
    async fn events_until_done(agent: &mut AgentSide, id: u64) -> Vec<gantry_proto::Event> {
        let mut events = Vec::new();
        loop {
            match next(agent).await {
                Message::Event(event) => events.push(event),
                Message::Response(response) => {
                    assert_eq!(response.id, id);
                    assert_eq!(response.result, Ok(Reply::Done));
                    return events;
                }
                other => panic!("{other:?}"),
            }
        }
    }

    fn output_at(container_id: &str, offset: u64, data: &[u8]) -> gantry_proto::Event {
        gantry_proto::Event::OutputAt {
            container_id: container_id.into(),
            exec_id: None,
            stream: gantry_proto::OutputStream::Stdout,
            offset,
            data: data.to_vec(),
        }
    }

    #[tokio::test]
    async fn a_restarted_agent_gets_the_output_from_its_position_then_the_exit_again() {
        let state = state();
        let (window, file, pump) = spawn_process(&state, "c");
        let (mut agent, task) = connect_to(&state);
        handshake(&mut agent).await;
        request(
            &mut agent,
            1,
            Op::SubscribeEventsFrom {
                positions: Vec::new(),
            },
        )
        .await;
        assert_eq!(events_until_done(&mut agent, 1).await, Vec::new());
        let file = write(file, b"first\n").await;
        assert_eq!(
            next(&mut agent).await,
            Message::Event(output_at("c", 0, b"first\n"))
        );
        // A probe that never subscribes gets no events.
        let (mut probe, probe_task) = connect_to(&state);
        handshake(&mut probe).await;

        // The agent dies having logged "fir"; the process writes on without it and ends.
        drop(agent);
        task.await.expect("task").expect("connection");
        drop(write(file, b"second\n").await);
        pump.await.expect("pump");
        let exit = gantry_proto::Event::Exit {
            container_id: "c".into(),
            exec_id: None,
            status: gantry_proto::ExitStatus::Code(0),
        };
        state
            .runtime
            .sink()
            .hand_over_exit(&window, gantry_proto::ExitStatus::Code(0))
            .await;

        let (mut agent, task) = connect_to(&state);
        handshake(&mut agent).await;
        let held = gantry_proto::OutputPosition {
            container_id: "c".into(),
            exec_id: None,
            position: 3,
        };
        request(
            &mut agent,
            2,
            Op::SubscribeEventsFrom {
                positions: vec![held],
            },
        )
        .await;
        assert_eq!(
            events_until_done(&mut agent, 2).await,
            vec![
                output_at("c", 3, b"st\n"),
                output_at("c", 6, b"second\n"),
                exit
            ],
            "the rest once, in order, then the exit"
        );
        // Positions of no process of the shim's, or past its output, are no failure.
        request(
            &mut agent,
            3,
            Op::OutputReceived {
                container_id: "c".into(),
                exec_id: None,
                position: u64::MAX,
            },
        )
        .await;
        let Message::Response(Response {
            id: 3,
            result: Err(error),
        }) = next(&mut agent).await
        else {
            panic!("expected an answer to 3");
        };
        assert_eq!(
            error.kind,
            ErrorKind::NotFound,
            "no container c in the runtime"
        );

        request(
            &mut probe,
            4,
            Op::Ping {
                payload: Vec::new(),
            },
        )
        .await;
        assert!(matches!(
            next(&mut probe).await,
            Message::Response(Response { id: 4, .. })
        ));
        drop(probe);
        probe_task.await.expect("probe task").expect("probe");
        drop(agent);
        task.await.expect("task").expect("connection");
    }

    #[tokio::test]
    async fn an_old_agent_subscribing_gets_plain_output_and_its_exit_once() {
        let state = state();
        let (window, file, pump) = spawn_process(&state, "c");
        let file = write(file, b"before\n").await;
        // Read and kept before any agent subscribes.
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            while window.kept_bytes() < 7 {
                tokio::time::sleep(std::time::Duration::from_millis(5)).await;
            }
        })
        .await
        .expect("the pump reads");
        let (mut agent, task) = connect_to(&state);
        handshake_as(&mut agent, ProtocolVersion { major: 1, minor: 2 }).await;
        request(&mut agent, 1, Op::SubscribeEvents).await;
        let output = |data: &[u8]| gantry_proto::Event::Output {
            container_id: "c".into(),
            exec_id: None,
            stream: gantry_proto::OutputStream::Stdout,
            data: data.to_vec(),
        };
        assert_eq!(
            events_until_done(&mut agent, 1).await,
            vec![output(b"before\n")],
            "what no connection took"
        );
        drop(write(file, b"after\n").await);
        assert_eq!(next(&mut agent).await, Message::Event(output(b"after\n")));
        pump.await.expect("pump");
        state
            .runtime
            .sink()
            .hand_over_exit(&window, gantry_proto::ExitStatus::Code(1))
            .await;
        assert!(matches!(
            next(&mut agent).await,
            Message::Event(gantry_proto::Event::Exit { .. })
        ));
        drop(agent);
        task.await.expect("task").expect("connection");

        // The next 1.2 agent: the output in flight is lost and the exit, taken, is not said again.
        let (mut agent, task) = connect_to(&state);
        handshake_as(&mut agent, ProtocolVersion { major: 1, minor: 2 }).await;
        request(&mut agent, 2, Op::SubscribeEvents).await;
        assert_eq!(events_until_done(&mut agent, 2).await, Vec::new());
        assert_eq!(window.kept_bytes(), 0, "and its window is open");
        drop(agent);
        task.await.expect("task").expect("connection");
    }
}
