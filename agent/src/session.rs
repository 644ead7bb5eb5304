//! One protocol session with a guest's shim: the `Hello` handshake, then requests multiplexed by id
//! and answered in any order, and the shim's events.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use gantry_proto::{
    ErrorReply, Event, FrameCodec, FrameError, Hello, Message, Op, PROTOCOL_VERSION, Reply,
    Request, RequestId, VersionError, negotiate,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::Framed;
use tracing::{debug, warn};

use crate::sync::lock;

/// Outgoing frames queued before `request` waits.
const OUTGOING_BACKLOG: usize = 64;

/// Errors of a session.
#[derive(Debug, Clone, thiserror::Error)]
pub enum SessionError {
    /// The handshake did not complete in time.
    #[error("the shim did not say hello within {0:?}")]
    HandshakeTimeout(Duration),
    /// The peer's protocol version is incompatible.
    #[error(transparent)]
    Version(#[from] VersionError),
    /// The peer refused the session and said why.
    #[error("the shim closed the session: {0}")]
    Refused(String),
    /// The peer broke the protocol.
    #[error("protocol error: {0}")]
    Protocol(String),
    /// The connection is gone.
    #[error("the session with the shim is closed")]
    Closed,
    /// The shim did not answer in time.
    #[error("the shim did not answer within {0:?}")]
    RequestTimeout(Duration),
    /// The shim answered with an error.
    #[error("the shim failed the request: {0}")]
    Remote(#[from] ErrorReply),
}

type Pending = Arc<Mutex<HashMap<RequestId, oneshot::Sender<Result<Reply, ErrorReply>>>>>;

/// A live session. Cheap to share: clone the `Arc` it comes in.
#[derive(Debug)]
pub struct ShimSession {
    peer: Hello,
    outgoing: mpsc::Sender<Message>,
    pending: Pending,
    next_id: AtomicU64,
    closed: watch::Receiver<Option<String>>,
}

impl ShimSession {
    /// Runs the handshake on `stream` and starts the session's I/O tasks. The shim's events go to
    /// `events`; a full channel stops reading from the shim (back-pressure, never unbounded memory).
    pub async fn establish<S>(
        stream: S,
        software_version: &str,
        handshake_timeout: Duration,
        max_frame_len: u32,
        events: mpsc::Sender<Event>,
    ) -> Result<Arc<Self>, SessionError>
    where
        S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    {
        let mut framed = Framed::new(stream, FrameCodec::new(max_frame_len));
        framed
            .send(Message::Hello(Hello::new(software_version)))
            .await
            .map_err(|err| SessionError::Protocol(err.to_string()))?;
        let first = tokio::time::timeout(handshake_timeout, framed.next())
            .await
            .map_err(|_| SessionError::HandshakeTimeout(handshake_timeout))?;
        let peer = match first {
            Some(Ok(Message::Hello(hello))) => hello,
            Some(Ok(Message::Goodbye { reason })) => return Err(SessionError::Refused(reason)),
            Some(Ok(other)) => {
                return Err(SessionError::Protocol(format!(
                    "expected Hello as the first frame, got {}",
                    other.kind()
                )));
            }
            Some(Err(err)) => return Err(SessionError::Protocol(err.to_string())),
            None => return Err(SessionError::Closed),
        };
        if let Err(err) = negotiate(PROTOCOL_VERSION, &peer) {
            // Tell the shim why before closing, so both logs say the same thing.
            let _ = framed
                .send(Message::Goodbye {
                    reason: err.to_string(),
                })
                .await;
            return Err(err.into());
        }
        debug!(peer = %peer.software_version, version = %peer.protocol_version, "shim session up");

        let (sink, stream) = framed.split();
        let (outgoing, outgoing_rx) = mpsc::channel(OUTGOING_BACKLOG);
        let (closed_tx, closed) = watch::channel(None);
        let pending: Pending = Arc::default();
        let session = Arc::new(Self {
            peer,
            outgoing,
            pending: pending.clone(),
            next_id: AtomicU64::new(1),
            closed,
        });
        tokio::spawn(async move {
            let reason = tokio::select! {
                reason = read_loop(stream, pending.clone(), events) => reason,
                reason = write_loop(sink, outgoing_rx) => reason,
            };
            debug!(%reason, "shim session closed");
            // Dropping the senders fails every request still waiting.
            lock(&pending).clear();
            let _ = closed_tx.send(Some(reason));
        });
        Ok(session)
    }

    /// The shim's `Hello`.
    pub fn peer(&self) -> &Hello {
        &self.peer
    }

    /// Sends `op` and waits for its answer.
    pub async fn request(&self, op: Op, timeout: Duration) -> Result<Reply, SessionError> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        if self.is_closed() {
            return Err(SessionError::Closed);
        }
        lock(&self.pending).insert(id, tx);
        let result = tokio::time::timeout(timeout, async {
            self.outgoing
                .send(Message::Request(Request { id, op }))
                .await
                .map_err(|_| SessionError::Closed)?;
            rx.await.map_err(|_| SessionError::Closed)
        })
        .await;
        // Whatever happened, the request is no longer waited for: a closed session or a timeout
        // must not leave its entry behind.
        lock(&self.pending).remove(&id);
        match result {
            Ok(Ok(reply)) => reply.map_err(SessionError::Remote),
            Ok(Err(err)) => Err(err),
            Err(_) => Err(SessionError::RequestTimeout(timeout)),
        }
    }

    /// Whether the connection is gone.
    pub fn is_closed(&self) -> bool {
        self.closed.borrow().is_some()
    }

    /// Waits until the connection is gone; returns why.
    pub async fn closed(&self) -> String {
        let mut closed = self.closed.clone();
        match closed.wait_for(Option::is_some).await {
            Ok(reason) => reason.clone().unwrap_or_default(),
            Err(_) => "session task ended".to_owned(),
        }
    }
}

async fn read_loop<S>(
    mut stream: futures::stream::SplitStream<Framed<S, FrameCodec>>,
    pending: Pending,
    events: mpsc::Sender<Event>,
) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(frame) = stream.next().await {
        match frame {
            Ok(Message::Response(response)) => {
                let waiter = lock(&pending).remove(&response.id);
                match waiter {
                    // The requester may have timed out and gone; nothing to do then.
                    Some(waiter) => {
                        let _ = waiter.send(response.result);
                    }
                    None => warn!(id = response.id, "response to no outstanding request"),
                }
            }
            Ok(Message::Event(event)) => {
                if events.send(event).await.is_err() {
                    return "the agent stopped taking events".to_owned();
                }
            }
            Ok(Message::Goodbye { reason }) => return format!("the shim said goodbye: {reason}"),
            Ok(other) => {
                return format!(
                    "protocol error: the shim sent {} after the handshake",
                    other.kind()
                );
            }
            Err(FrameError::Io(err)) => return format!("connection error: {err}"),
            Err(err) => return format!("protocol error: {err}"),
        }
    }
    "the shim closed the connection".to_owned()
}

async fn write_loop<S>(
    mut sink: futures::stream::SplitSink<Framed<S, FrameCodec>, Message>,
    mut outgoing: mpsc::Receiver<Message>,
) -> String
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    while let Some(message) = outgoing.recv().await {
        if let Err(err) = sink.send(message).await {
            return format!("cannot send to the shim: {err}");
        }
    }
    "session dropped".to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_proto::{ErrorKind, ProtocolVersion, Response};

    const SECOND: Duration = Duration::from_secs(1);

    /// An event channel nobody reads (these tests send no events).
    fn events() -> mpsc::Sender<Event> {
        mpsc::channel(16).0
    }

    /// A scripted shim on the other end of an in-memory stream.
    fn fake_shim(
        hello: Hello,
    ) -> (
        tokio::io::DuplexStream,
        Framed<tokio::io::DuplexStream, FrameCodec>,
    ) {
        let (agent_end, shim_end) = tokio::io::duplex(1 << 16);
        let mut shim = Framed::new(shim_end, FrameCodec::default());
        // Queue the shim's Hello; the agent reads it after sending its own.
        futures::executor::block_on(shim.send(Message::Hello(hello))).unwrap();
        (agent_end, shim)
    }

    #[tokio::test]
    async fn responses_out_of_order_reach_their_requests() {
        let (agent_end, mut shim) = fake_shim(Hello::new("fake-shim"));
        let session = ShimSession::establish(agent_end, "test", SECOND, 1 << 20, events())
            .await
            .unwrap();
        assert_eq!(session.peer().software_version, "fake-shim");
        let shim_task = tokio::spawn(async move {
            assert!(matches!(shim.next().await, Some(Ok(Message::Hello(_)))));
            let mut ids = Vec::new();
            for _ in 0..2 {
                match shim.next().await {
                    Some(Ok(Message::Request(Request {
                        id,
                        op: Op::Ping { payload },
                    }))) => ids.push((id, payload)),
                    other => panic!("unexpected {other:?}"),
                }
            }
            // Answer in reverse order.
            for (id, payload) in ids.into_iter().rev() {
                shim.send(Message::Response(Response {
                    id,
                    result: Ok(Reply::Pong { payload }),
                }))
                .await
                .unwrap();
            }
            shim
        });
        let (a, b) = tokio::join!(
            session.request(Op::Ping { payload: vec![1] }, SECOND),
            session.request(Op::Ping { payload: vec![2] }, SECOND),
        );
        assert_eq!(a.unwrap(), Reply::Pong { payload: vec![1] });
        assert_eq!(b.unwrap(), Reply::Pong { payload: vec![2] });
        drop(shim_task.await.unwrap());
        let reason = session.closed().await;
        assert!(reason.contains("closed the connection"), "{reason}");
        assert!(matches!(
            session.request(Op::GuestInfo, SECOND).await,
            Err(SessionError::Closed)
        ));
    }

    #[tokio::test]
    async fn remote_errors_and_timeouts_are_reported() {
        let (agent_end, mut shim) = fake_shim(Hello::new("fake-shim"));
        let session = ShimSession::establish(agent_end, "test", SECOND, 1 << 20, events())
            .await
            .unwrap();
        let shim_task = tokio::spawn(async move {
            shim.next().await; // Hello
            let Some(Ok(Message::Request(first))) = shim.next().await else {
                panic!()
            };
            shim.send(Message::Response(Response {
                id: first.id,
                result: Err(ErrorReply {
                    kind: ErrorKind::Unsupported,
                    message: "nope".into(),
                }),
            }))
            .await
            .unwrap();
            // Never answer the second request.
            let _ = shim.next().await;
            shim
        });
        let err = session.request(Op::GuestInfo, SECOND).await.unwrap_err();
        assert!(
            matches!(&err, SessionError::Remote(e) if e.kind == ErrorKind::Unsupported),
            "{err}"
        );
        let err = session
            .request(Op::GuestInfo, Duration::from_millis(100))
            .await
            .unwrap_err();
        assert!(matches!(err, SessionError::RequestTimeout(_)));
        assert!(
            session.pending.lock().unwrap().is_empty(),
            "a timed-out request must not leak"
        );
        drop(shim_task);
    }

    #[tokio::test]
    async fn requests_on_a_closed_session_fail_and_leave_nothing_pending() {
        let (agent_end, mut shim) = fake_shim(Hello::new("fake-shim"));
        let session = ShimSession::establish(agent_end, "test", SECOND, 1 << 20, events())
            .await
            .unwrap();
        shim.next().await; // Hello
        drop(shim);
        tokio::time::timeout(SECOND, session.closed())
            .await
            .unwrap();
        for _ in 0..3 {
            let err = session.request(Op::GuestInfo, SECOND).await.unwrap_err();
            assert!(matches!(err, SessionError::Closed), "{err}");
        }
        assert!(session.pending.lock().unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_major_mismatch_is_refused_and_the_shim_is_told_why() {
        let mut hello = Hello::new("old-shim 0.0.1");
        hello.protocol_version = ProtocolVersion {
            major: PROTOCOL_VERSION.major + 1,
            minor: 0,
        };
        let (agent_end, mut shim) = fake_shim(hello);
        let err = ShimSession::establish(agent_end, "test", SECOND, 1 << 20, events())
            .await
            .unwrap_err();
        assert!(matches!(err, SessionError::Version(_)), "{err}");
        assert!(matches!(shim.next().await, Some(Ok(Message::Hello(_)))));
        match shim.next().await {
            Some(Ok(Message::Goodbye { reason })) => {
                assert!(reason.contains(&PROTOCOL_VERSION.to_string()), "{reason}");
                assert!(
                    reason.contains(&format!("{}.0", PROTOCOL_VERSION.major + 1)),
                    "{reason}"
                );
            }
            other => panic!("expected Goodbye, got {other:?}"),
        }
    }

    #[tokio::test]
    async fn garbage_from_the_shim_closes_the_session_without_panic() {
        let (agent_end, mut shim) = fake_shim(Hello::new("fake-shim"));
        let session = ShimSession::establish(agent_end, "test", SECOND, 1 << 20, events())
            .await
            .unwrap();
        use tokio::io::AsyncWriteExt;
        shim.get_mut()
            .write_all(&[8, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 1, 2, 3, 4])
            .await
            .unwrap();
        let reason = tokio::time::timeout(SECOND, session.closed())
            .await
            .unwrap();
        assert!(reason.contains("protocol error"), "{reason}");
        assert!(session.is_closed());
    }

    #[tokio::test]
    async fn a_silent_peer_times_out_the_handshake() {
        let (agent_end, _shim_end) = tokio::io::duplex(1024);
        let err = ShimSession::establish(
            agent_end,
            "test",
            Duration::from_millis(50),
            1 << 20,
            events(),
        )
        .await
        .unwrap_err();
        assert!(matches!(err, SessionError::HandshakeTimeout(_)));
    }
}
