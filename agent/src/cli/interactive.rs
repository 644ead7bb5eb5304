//! Interactive sessions of `run -i/-t` and `exec -i/-t`, as `docker run -it` has them: standard
//! input forwarded to the process (batched, closed at end of file), and with `-t` the local
//! terminal in raw mode (restored on every way out) and its window-size changes forwarded.

use std::future::Future;
use std::io::Read;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};

use anyhow::Context;
use gantry_api::ApiClient;
use gantry_api::records::ExitRecord;
use gantry_proto::TtySize;
use hyper::Method;
use nix::sys::termios::{self, SetArg, Termios};
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio::sync::mpsc;
use tracing::debug;

/// Bytes read from standard input at a time.
const READ_CHUNK: usize = 32 * 1024;
/// Largest stdin write sent in one request (the agent accepts 1 MiB).
const MAX_BATCH: usize = 512 * 1024;

/// The local terminal in raw mode until dropped, which restores what it was.
#[derive(Debug)]
pub struct RawMode {
    saved: Termios,
}

impl RawMode {
    /// Puts standard input's terminal in raw mode; `None` if standard input is not a terminal.
    pub fn enter() -> anyhow::Result<Option<Self>> {
        let stdin = std::io::stdin();
        if !is_terminal(stdin.as_fd()) {
            return Ok(None);
        }
        let saved = termios::tcgetattr(stdin.as_fd()).context("reading the terminal's mode")?;
        let mut raw = saved.clone();
        termios::cfmakeraw(&mut raw);
        termios::tcsetattr(stdin.as_fd(), SetArg::TCSANOW, &raw)
            .context("putting the terminal in raw mode")?;
        Ok(Some(Self { saved }))
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        let stdin = std::io::stdin();
        if let Err(errno) = termios::tcsetattr(stdin.as_fd(), SetArg::TCSADRAIN, &self.saved) {
            eprintln!("warning: cannot restore the terminal's mode: {errno} (try `stty sane`)");
        }
    }
}

fn is_terminal(fd: BorrowedFd<'_>) -> bool {
    nix::unistd::isatty(fd.as_raw_fd()).unwrap_or(false)
}

/// The size of the local terminal (stdout's, else stdin's), if there is one.
pub fn local_size() -> Option<TtySize> {
    let (stdout, stdin) = (std::io::stdout(), std::io::stdin());
    [stdout.as_fd(), stdin.as_fd()].into_iter().find_map(|fd| {
        // SAFETY: winsize is plain old data; zero is valid.
        let mut winsize: libc::winsize = unsafe { std::mem::zeroed() };
        // SAFETY: TIOCGWINSZ writes one `winsize` into the one we pass.
        let ok = unsafe { libc::ioctl(fd.as_raw_fd(), libc::TIOCGWINSZ, &mut winsize) } == 0;
        (ok && winsize.ws_row > 0 && winsize.ws_col > 0).then_some(TtySize {
            rows: winsize.ws_row,
            cols: winsize.ws_col,
        })
    })
}

/// What to attach to a running process.
#[derive(Debug)]
pub struct Attach {
    /// The agent.
    pub client: ApiClient,
    /// The VM.
    pub vm: String,
    /// The container.
    pub id: String,
    /// The exec, or `None` for the main process.
    pub exec: Option<String>,
    /// Forward standard input (`-i`).
    pub stdin: bool,
    /// The process has a terminal (`-t`).
    pub tty: bool,
    /// `SIGWINCH`, listened to before the terminal's size was first read (with `tty`).
    pub window_changes: Option<Signal>,
}

impl Attach {
    /// `/v1/vms/{vm}/containers/{id}` and `&exec=E` (empty for the main process).
    fn route(&self) -> (String, String) {
        let exec = self
            .exec
            .as_deref()
            .map(|e| format!("&exec={e}"))
            .unwrap_or_default();
        (format!("/v1/vms/{}/containers/{}", self.vm, self.id), exec)
    }
}

/// Listens to `SIGWINCH` (call before reading the terminal's initial size, so no change is
/// missed in between).
pub fn window_changes() -> anyhow::Result<Signal> {
    signal(SignalKind::window_change()).context("listening to SIGWINCH")
}

/// Runs `follow` (the process's output, to its exit) with standard input and window-size
/// changes forwarded, the local terminal raw meanwhile if the process has a terminal.
pub async fn attach<F>(attach: Attach, follow: F) -> anyhow::Result<ExitRecord>
where
    F: Future<Output = anyhow::Result<ExitRecord>>,
{
    // Raw only when keystrokes go to a remote terminal; restored when this function returns,
    // however it returns (the guard also restores on a panic's unwinding).
    let raw = match attach.tty && attach.stdin {
        true => RawMode::enter()?,
        false => None,
    };
    let mut tasks = Vec::new();
    // The container's route and the exec's query suffix.
    let attach_path = attach.route();
    if attach.stdin {
        let (base, exec) = &attach_path;
        tasks.push(tokio::spawn(forward_stdin(
            attach.client.clone(),
            format!("{base}/stdin?{exec}"),
            format!("{base}/stdin?close=true{exec}"),
        )));
    }
    let Attach {
        client,
        window_changes,
        tty,
        ..
    } = attach;
    if let (true, Some(changes)) = (tty, window_changes) {
        let resize_base = attach_path.clone();
        let path = move |size: TtySize| {
            format!(
                "{}/resize?rows={}&cols={}{}",
                resize_base.0, size.rows, size.cols, resize_base.1
            )
        };
        tasks.push(tokio::spawn(forward_resizes(client, changes, path)));
    }
    let outcome = if raw.is_some() {
        // In raw mode ^C is a byte for the remote side; a signal from elsewhere must still
        // end the session with the terminal restored.
        let mut term = signal(SignalKind::terminate()).context("listening to SIGTERM")?;
        let mut hangup = signal(SignalKind::hangup()).context("listening to SIGHUP")?;
        tokio::select! {
            outcome = follow => outcome,
            _ = term.recv() => Err(anyhow::anyhow!("terminated (SIGTERM)")),
            _ = hangup.recv() => Err(anyhow::anyhow!("hung up (SIGHUP)")),
        }
    } else {
        follow.await
    };
    for task in tasks {
        task.abort();
    }
    drop(raw);
    outcome
}

/// Reads standard input on a thread of its own (a blocking read cannot be cancelled; the thread
/// ends with the process) and posts it in batches; at end of file closes the process's stdin.
async fn forward_stdin(client: ApiClient, write_path: String, close_path: String) {
    let (chunks, mut received) = mpsc::channel::<Vec<u8>>(16);
    let reader = std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin().lock();
            let mut buffer = vec![0u8; READ_CHUNK];
            loop {
                match stdin.read(&mut buffer) {
                    Ok(0) => return,
                    Ok(n) => {
                        if chunks.blocking_send(buffer[..n].to_vec()).is_err() {
                            return;
                        }
                    }
                    Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
                    Err(err) => {
                        debug!(%err, "reading standard input");
                        return;
                    }
                }
            }
        });
    if let Err(err) = reader {
        eprintln!("warning: cannot read standard input: {err}");
        return;
    }
    while let Some(mut batch) = received.recv().await {
        // Whatever else is queued goes in the same request.
        while batch.len() < MAX_BATCH {
            match received.try_recv() {
                Ok(more) => batch.extend_from_slice(&more),
                Err(_) => break,
            }
        }
        if let Err(err) = post(&client, &write_path, batch).await {
            // The process exited or closed its input: nothing more to send.
            debug!(%err, "stdin not delivered");
            return;
        }
    }
    if let Err(err) = post(&client, &close_path, Vec::new()).await {
        debug!(%err, "stdin not closed");
    }
}

/// Sends the local terminal's size now (it may have changed since the process was created) and
/// after every `SIGWINCH`.
async fn forward_resizes(client: ApiClient, mut changes: Signal, path: impl Fn(TtySize) -> String) {
    loop {
        if let Some(size) = local_size()
            && let Err(err) = post(&client, &path(size), Vec::new()).await
        {
            debug!(%err, "resize not delivered");
        }
        if changes.recv().await.is_none() {
            return;
        }
    }
}

async fn post(client: &ApiClient, path: &str, body: Vec<u8>) -> anyhow::Result<()> {
    use http_body_util::BodyExt;
    let answer = client.open(Method::POST, path, body).await?;
    answer.collect().await?;
    Ok(())
}
