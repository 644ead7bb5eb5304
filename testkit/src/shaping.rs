//! A shaping TCP proxy: what a client on loopback sees of a server across a slower, longer link.
//!
//! The kernel here has `tbf` but no `netem`, so delay is added in user space. Each direction of
//! every connection goes through one shared [`Link`] per direction: a token bucket (the rate,
//! with a small bucket so that timer granularity does not cost throughput) followed by a fixed
//! one-way delay. Data is forwarded in reads of at most 16 KiB; each read waits for the bucket
//! (which pushes back on the sender, as TCP's flow control would), then is released `delay`
//! after its last byte left the bucket, in order. A new connection waits one round trip before
//! forwarding anything (the TCP handshake of a real link).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio::time::Instant;

/// Largest read forwarded as one piece.
const READ_BYTES: usize = 16 << 10;
/// Pieces of one direction of a connection between the bucket and the delay line (they are
/// released at the link's rate, so this only bounds memory when a receiver stops reading).
const IN_FLIGHT_PIECES: usize = 1024;

/// The link the proxy imitates.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Shaping {
    /// Bytes per second in each direction, shared by all connections.
    pub bytes_per_sec: u64,
    /// The token bucket's depth in bytes: how far a sender may run ahead of the rate after a
    /// pause.
    pub bucket_bytes: u64,
    /// Added to every piece of data, in each direction (a round trip adds it twice).
    pub one_way_delay: Duration,
}

impl Shaping {
    /// `megabits` Mbit/s and `round_trip` added round trip time, with a 64 KiB bucket.
    pub fn link(megabits: u64, round_trip: Duration) -> Shaping {
        Shaping {
            bytes_per_sec: megabits * 1_000_000 / 8,
            bucket_bytes: 64 << 10,
            one_way_delay: round_trip / 2,
        }
    }
}

impl std::fmt::Display for Shaping {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} Mbit/s each way (token bucket of {} KiB, shared by all connections), \
             {} ms added one-way delay ({} ms round trip), one round trip per new connection",
            self.bytes_per_sec * 8 / 1_000_000,
            self.bucket_bytes >> 10,
            self.one_way_delay.as_millis(),
            self.one_way_delay.as_millis() * 2
        )
    }
}

/// One direction of the imitated link: a token bucket and a delay.
#[derive(Debug)]
struct Link {
    shaping: Shaping,
    /// When the bucket has room again for the bytes reserved so far (a virtual clock: it
    /// runs ahead of now while the link is busy).
    free_at: Mutex<Instant>,
    /// Bytes delivered to the far side.
    delivered: AtomicU64,
}

impl Link {
    fn new(shaping: Shaping) -> Link {
        Link {
            shaping,
            free_at: Mutex::new(Instant::now()),
            delivered: AtomicU64::new(0),
        }
    }

    /// Reserves the link for `bytes`; returns when their last byte has left the bucket (now,
    /// if the bucket holds enough).
    fn reserve(&self, bytes: usize) -> Instant {
        let rate = self.shaping.bytes_per_sec.max(1) as f64;
        let burst = Duration::from_secs_f64(self.shaping.bucket_bytes as f64 / rate);
        let now = Instant::now();
        let mut free_at = self.free_at.lock().unwrap_or_else(|p| p.into_inner());
        // An idle link fills the bucket, up to its depth: the clock may lag now by that much.
        let start = (*free_at).max(now.checked_sub(burst).unwrap_or(now));
        *free_at = start + Duration::from_secs_f64(bytes as f64 / rate);
        (*free_at).max(now)
    }
}

/// A shaping TCP proxy on 127.0.0.1 in front of one server, stopped on drop.
#[derive(Debug)]
pub struct ShapingProxy {
    /// The port it listens on.
    pub port: u16,
    /// The link's settings.
    pub shaping: Shaping,
    down: Arc<Link>,
    up: Arc<Link>,
    connections: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl ShapingProxy {
    /// Listens on a free loopback port and forwards every connection to `upstream` through
    /// the link `shaping` describes (on the current tokio runtime).
    pub async fn start(upstream: SocketAddr, shaping: Shaping) -> std::io::Result<ShapingProxy> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let down = Arc::new(Link::new(shaping));
        let up = Arc::new(Link::new(shaping));
        let connections = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (down, up, connections) = (down.clone(), up.clone(), connections.clone());
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::Relaxed);
                    tokio::spawn(connection(client, upstream, down.clone(), up.clone()));
                }
            }
        });
        Ok(ShapingProxy {
            port,
            shaping,
            down,
            up,
            connections,
            task,
        })
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Bytes delivered from the server to clients so far (HTTP headers included).
    pub fn bytes_down(&self) -> u64 {
        self.down.delivered.load(Ordering::Relaxed)
    }

    /// Bytes delivered from clients to the server so far.
    pub fn bytes_up(&self) -> u64 {
        self.up.delivered.load(Ordering::Relaxed)
    }

    /// A reader of [`Self::bytes_down`] that can be moved to another thread.
    pub fn bytes_down_reader(&self) -> impl Fn() -> u64 + Send + Sync + 'static {
        let down = Arc::clone(&self.down);
        move || down.delivered.load(Ordering::Relaxed)
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> u64 {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for ShapingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn connection(client: TcpStream, upstream: SocketAddr, down: Arc<Link>, up: Arc<Link>) {
    let Ok(server) = TcpStream::connect(upstream).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    // The handshake of the imitated link: one round trip before the first byte goes through.
    tokio::time::sleep(down.shaping.one_way_delay + up.shaping.one_way_delay).await;
    let (client_read, client_write) = client.into_split();
    let (server_read, server_write) = server.into_split();
    tokio::join!(
        direction(client_read, server_write, up),
        direction(server_read, client_write, down),
    );
}

/// Forwards `from` to `to` through `link` until `from` ends or either side fails.
async fn direction(mut from: OwnedReadHalf, mut to: OwnedWriteHalf, link: Arc<Link>) {
    let (pieces, mut delayed) = mpsc::channel::<(Vec<u8>, Instant)>(IN_FLIGHT_PIECES);
    let delay = link.shaping.one_way_delay;
    let reader = {
        let link = Arc::clone(&link);
        async move {
            loop {
                let mut piece = vec![0; READ_BYTES];
                let n = match from.read(&mut piece).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => n,
                };
                piece.truncate(n);
                let sent = link.reserve(n);
                tokio::time::sleep_until(sent).await;
                if pieces.send((piece, sent + delay)).await.is_err() {
                    break;
                }
            }
            // Dropping the sender lets the writer finish what is in flight, then shut down.
        }
    };
    let writer = async move {
        while let Some((piece, at)) = delayed.recv().await {
            tokio::time::sleep_until(at).await;
            if to.write_all(&piece).await.is_err() {
                return;
            }
            link.delivered
                .fetch_add(piece.len() as u64, Ordering::Relaxed);
        }
        let _ = to.shutdown().await;
    };
    tokio::join!(reader, writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An echo server on loopback.
    async fn echo_server() -> SocketAddr {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let (mut read, mut write) = stream.split();
                    let _ = tokio::io::copy(&mut read, &mut write).await;
                });
            }
        });
        address
    }

    #[tokio::test]
    async fn round_trips_take_the_added_delay_and_bulk_data_the_rate() {
        let shaping = Shaping::link(80, Duration::from_millis(40));
        let proxy = ShapingProxy::start(echo_server().await, shaping)
            .await
            .unwrap();
        let mut stream = TcpStream::connect(("127.0.0.1", proxy.port)).await.unwrap();
        stream.set_nodelay(true).unwrap();
        // The first exchange also pays for the handshake.
        let started = Instant::now();
        stream.write_all(b"ping").await.unwrap();
        let mut answer = [0u8; 4];
        stream.read_exact(&mut answer).await.unwrap();
        assert_eq!(&answer, b"ping");
        assert!(
            started.elapsed() >= Duration::from_millis(80),
            "{:?}",
            started.elapsed()
        );
        let started = Instant::now();
        stream.write_all(b"pong").await.unwrap();
        stream.read_exact(&mut answer).await.unwrap();
        let round_trip = started.elapsed();
        assert!(
            round_trip >= Duration::from_millis(40) && round_trip < Duration::from_secs(2),
            "{round_trip:?}"
        );
        // 2 MB at 10 MB/s: at least 0.2 s less the bucket, plus the round trip.
        let bulk = vec![7u8; 2_000_000];
        let started = Instant::now();
        let (mut read, mut write) = stream.into_split();
        let sender = tokio::spawn(async move { write.write_all(&bulk).await.unwrap() });
        let mut received = vec![0u8; 2_000_000];
        read.read_exact(&mut received).await.unwrap();
        sender.await.unwrap();
        let took = started.elapsed();
        assert!(
            took >= Duration::from_millis(190) && took < Duration::from_secs(10),
            "{took:?}"
        );
        assert!(received.iter().all(|&b| b == 7));
        assert_eq!(proxy.bytes_down(), 2_000_008);
        assert_eq!(proxy.bytes_up(), 2_000_008);
        assert_eq!(proxy.connections(), 1);
    }
}
