//! A process's standard streams between containerd's FIFOs and the agent: output records from
//! `GET …/logs?follow=true` to the stdout/stderr FIFOs, the stdin FIFO to `POST …/stdin`.

use std::sync::Arc;

use gantry_api::records::{ExitRecord, LogItem};
use gantry_api::stream::BodyStream;
use gantry_proto::OutputStream;
use tokio::io::{AsyncReadExt as _, AsyncWrite, AsyncWriteExt as _};
use tokio::net::unix::pipe;
use tokio::sync::Notify;
use tracing::warn;

use crate::agent::Agent;

/// Errors opening a stream.
#[derive(Debug, thiserror::Error)]
pub enum IoError {
    /// The path cannot be opened.
    #[error("opening {path}: {source}")]
    Open {
        /// The path containerd gave.
        path: String,
        /// Why.
        source: std::io::Error,
    },
    /// A URI scheme this shim does not serve.
    #[error("stdio {0:?}: only FIFOs and file:// paths are supported")]
    Unsupported(String),
}

/// Where an output stream goes.
type Sink = Box<dyn AsyncWrite + Send + Unpin>;

/// The path a containerd stdio name stands for; `None` for no stream.
fn local_path(name: &str) -> Result<Option<&str>, IoError> {
    if name.is_empty() {
        return Ok(None);
    }
    if let Some(path) = name.strip_prefix("file://") {
        return Ok(Some(path));
    }
    if name.contains("://") {
        return Err(IoError::Unsupported(name.to_owned()));
    }
    Ok(Some(name))
}

fn is_fifo(path: &str) -> bool {
    use std::os::unix::fs::FileTypeExt;
    std::fs::metadata(path).is_ok_and(|meta| meta.file_type().is_fifo())
}

/// Opens an output stream: a FIFO (read-write, so that the open never fails for want of a
/// reader, and the reader sees the end when this side closes), or a file appended to.
async fn open_sink(name: &str) -> Result<Option<Sink>, IoError> {
    let Some(path) = local_path(name)? else {
        return Ok(None);
    };
    let open = |source| IoError::Open {
        path: path.to_owned(),
        source,
    };
    if is_fifo(path) {
        let sender = pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(path)
            .map_err(open)?;
        return Ok(Some(Box::new(sender)));
    }
    let file = tokio::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .await
        .map_err(open)?;
    Ok(Some(Box::new(file)))
}

/// A process's output streams.
pub struct Outputs {
    stdout: Option<Sink>,
    stderr: Option<Sink>,
}

impl std::fmt::Debug for Outputs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Outputs")
            .field("stdout", &self.stdout.is_some())
            .field("stderr", &self.stderr.is_some())
            .finish()
    }
}

impl Outputs {
    /// Opens the streams containerd named (empty names: none).
    pub async fn open(stdout: &str, stderr: &str) -> Result<Self, IoError> {
        Ok(Self {
            stdout: open_sink(stdout).await?,
            stderr: open_sink(stderr).await?,
        })
    }

    /// Copies a process's output records until its end record, which it returns (`None`: the
    /// stream ended without one, e.g. the agent went away). A stream nobody reads any more is
    /// dropped; the rest still flows, so that the end is seen. Both streams are closed on
    /// return: the reader sees their end.
    pub async fn copy_from(mut self, mut records: BodyStream) -> Option<ExitRecord> {
        let exit = loop {
            match records.record().await {
                Ok(Some(LogItem::Output(stream, bytes))) => {
                    let sink = match stream {
                        OutputStream::Stdout => &mut self.stdout,
                        OutputStream::Stderr => &mut self.stderr,
                    };
                    write_or_drop(sink, &bytes).await;
                }
                Ok(Some(LogItem::Exit(exit))) => break Some(exit),
                Ok(None) => break None,
                Err(error) => {
                    warn!(%error, "the process's output stream broke off");
                    break None;
                }
            }
        };
        for sink in [&mut self.stdout, &mut self.stderr].into_iter().flatten() {
            let _ = sink.shutdown().await;
        }
        exit
    }
}

async fn write_or_drop(sink: &mut Option<Sink>, bytes: &[u8]) {
    if let Some(writer) = sink
        && let Err(error) = writer.write_all(bytes).await
    {
        warn!(%error, "an output stream's reader went away; its output is dropped");
        *sink = None;
    }
}

/// The largest piece of standard input sent in one request.
const STDIN_CHUNK: usize = 64 << 10;

/// Where a process's standard input goes.
#[derive(Debug, Clone)]
pub struct StdinTarget {
    /// The agent.
    pub agent: Agent,
    /// The VM.
    pub vm: String,
    /// The container.
    pub id: String,
    /// The exec, or the main process.
    pub exec_id: Option<String>,
}

/// Copies the stdin FIFO `name` to the process until its writer (the client) closes it or
/// `close` is notified (containerd's `CloseIO`), then closes the process's input.
///
/// The FIFO is opened read-only: reads wait for the client's end, and end when the client
/// closes it, as with runc's shim. A copy still waiting for a client that never came ends
/// with the task ([`release_stdin`]).
pub async fn copy_stdin(
    name: &str,
    target: StdinTarget,
    close: Arc<Notify>,
) -> Result<(), IoError> {
    let Some(path) = local_path(name)? else {
        return Ok(());
    };
    if !is_fifo(path) {
        return Err(IoError::Unsupported(name.to_owned()));
    }
    let send = |bytes: Vec<u8>, last: bool| {
        let target = target.clone();
        async move {
            target
                .agent
                .stdin(
                    &target.vm,
                    &target.id,
                    target.exec_id.as_deref(),
                    bytes,
                    last,
                )
                .await
        }
    };
    let mut fifo = open_stdin_fifo(path).map_err(|source| IoError::Open {
        path: path.to_owned(),
        source,
    })?;
    let mut buffer = vec![0u8; STDIN_CHUNK];
    loop {
        tokio::select! {
            read = fifo.read(&mut buffer) => match read {
                Ok(0) => break,
                Ok(n) => {
                    if let Err(error) = send(buffer[..n].to_vec(), false).await {
                        warn!(%error, "standard input could not be delivered; it is closed");
                        break;
                    }
                }
                Err(error) => {
                    warn!(%error, "reading the stdin FIFO");
                    break;
                }
            },
            () = close.notified() => break,
        }
    }
    if let Err(error) = send(Vec::new(), true).await {
        warn!(%error, "closing the process's standard input");
    }
    Ok(())
}

/// Opens a stdin FIFO for reading without waiting for its writer. Reads wait for the writer
/// and end once it has come and gone: Linux reports no hang-up to a reader that has seen no
/// writer yet, and the non-blocking descriptor is only read when epoll says so.
fn open_stdin_fifo(path: &str) -> std::io::Result<pipe::Receiver> {
    pipe::OpenOptions::new().open_receiver(path)
}

/// Releases a [`copy_stdin`] still waiting for its client: opening the FIFO's writing end
/// (without waiting) completes its open, and closing it ends its reads. Nothing happens when
/// no reader waits.
pub fn release_stdin(name: &str) {
    use std::os::unix::fs::OpenOptionsExt as _;
    if let Ok(Some(path)) = local_path(name)
        && is_fifo(path)
    {
        let _ = std::fs::OpenOptions::new()
            .write(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(path);
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn stdin_reads_wait_for_the_writer_and_end_when_it_leaves() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdin");
        nix_mkfifo(&path);
        let mut fifo = open_stdin_fifo(path.to_str().unwrap()).unwrap();
        let mut buffer = [0u8; 16];
        let early = tokio::time::timeout(Duration::from_millis(200), fifo.read(&mut buffer)).await;
        assert!(early.is_err(), "no end before a writer came: {early:?}");
        let mut writer = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::io::Write::write_all(&mut writer, b"in").unwrap();
        drop(writer);
        let mut read = Vec::new();
        fifo.read_to_end(&mut read).await.unwrap();
        assert_eq!(read, b"in");
        // A writer that comes and goes at once releases a waiting reader.
        let mut waiting = open_stdin_fifo(path.to_str().unwrap()).unwrap();
        release_stdin(path.to_str().unwrap());
        let end = tokio::time::timeout(Duration::from_secs(5), waiting.read(&mut buffer)).await;
        assert!(matches!(end, Ok(Ok(0))), "{end:?}");
    }

    #[test]
    fn stdio_names_map_to_paths_or_are_refused() {
        assert_eq!(local_path("").unwrap(), None);
        assert_eq!(local_path("/run/x/stdout").unwrap(), Some("/run/x/stdout"));
        assert_eq!(local_path("file:///var/log/x").unwrap(), Some("/var/log/x"));
        assert!(matches!(
            local_path("binary:///usr/bin/logger"),
            Err(IoError::Unsupported(_))
        ));
    }

    #[tokio::test]
    async fn output_goes_to_a_file_and_is_appended() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.log");
        std::fs::write(&path, b"before\n").unwrap();
        let name = format!("file://{}", path.display());
        let mut sink = open_sink(&name).await.unwrap();
        write_or_drop(&mut sink, b"after\n").await;
        sink.unwrap().shutdown().await.unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"before\nafter\n");
    }

    #[tokio::test]
    async fn a_fifo_sink_delivers_everything_then_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("stdout");
        nix_mkfifo(&path);
        let name = path.to_str().unwrap().to_owned();
        // The reader is there first (opened without waiting), as containerd's is.
        let mut reader = open_stdin_fifo(&name).unwrap();
        let mut sink = open_sink(&name).await.unwrap();
        write_or_drop(&mut sink, b"hello").await;
        sink.unwrap().shutdown().await.unwrap();
        let mut read = Vec::new();
        reader.read_to_end(&mut read).await.unwrap();
        assert_eq!(read, b"hello", "all of it, then the end");
    }

    fn nix_mkfifo(path: &Path) {
        let c_path = std::ffi::CString::new(path.to_str().unwrap()).unwrap();
        // SAFETY: a valid NUL-terminated path; mkfifo only reads it.
        let rc = unsafe { libc::mkfifo(c_path.as_ptr(), 0o600) };
        assert_eq!(rc, 0, "mkfifo: {}", std::io::Error::last_os_error());
    }
}
