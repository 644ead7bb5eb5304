//! Interactive use end to end, one booted guest: `run -i` forwards standard input, `run -it` and
//! `exec -it` drive a shell on a pseudo-terminal in the guest from a pseudo-terminal here (the CLI
//! runs on the slave as its controlling terminal, the test types on the master), forward window
//! size changes, pass the exit code, and restore the local terminal.

use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use gantry_e2e::{TestAgent, TestVm, agent_binary};
use nix::sys::termios::{self, LocalFlags, Termios};

const BOOT_TIMEOUT: Duration = Duration::from_secs(180);
const STEP_TIMEOUT: Duration = Duration::from_secs(60);
const VM: &str = "vm-tty";

fn agent() -> &'static TestAgent {
    static AGENT: OnceLock<TestAgent> = OnceLock::new();
    AGENT.get_or_init(|| {
        let agent = TestAgent::start(&[TestVm::new(VM, 21).memory(384)]).expect("agent starts");
        agent
            .wait_guest_info(VM, BOOT_TIMEOUT)
            .expect("the guest boots");
        agent
    })
}

fn cli() -> Command {
    let mut command = Command::new(agent_binary());
    command.arg("--api-socket").arg(agent().api_socket());
    command
}

/// A child killed (and reaped) if the test ends before it does.
struct Reaped(Option<Child>);

impl Reaped {
    fn wait(mut self, timeout: Duration) -> ExitStatus {
        let mut child = self.0.take().expect("a child");
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = child.try_wait().expect("poll") {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                panic!("the CLI did not exit within {timeout:?}");
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Reaped {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

#[test]
fn run_i_forwards_piped_stdin() {
    let mut child = cli()
        .args(["run", "--vm", VM, "-q", "--rm", "-i", "default", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn run -i");
    let mut stdin = child.stdin.take().expect("stdin");
    let mut stdout = child.stdout.take().expect("stdout");
    let mut stderr = child.stderr.take().expect("stderr");
    let reaped = Reaped(Some(child));
    stdin.write_all(b"hi\n").expect("write");
    drop(stdin);
    let out = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stdout.read_to_string(&mut text);
        text
    });
    let err = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = stderr.read_to_string(&mut text);
        text
    });
    let status = reaped.wait(STEP_TIMEOUT);
    let (out, err) = (out.join().unwrap(), err.join().unwrap());
    assert!(status.success(), "{status}: {err}\n{}", agent().log());
    assert_eq!(out, "hi\n", "stderr: {err}");
}

/// The test's side of a pseudo-terminal the CLI runs on.
struct Terminal {
    master: OwnedFd,
    /// Kept to read the terminal's mode (the CLI's raw mode, then its restoration).
    slave: Option<OwnedFd>,
    output: Arc<Mutex<Vec<u8>>>,
}

impl Terminal {
    fn open(rows: u16, cols: u16) -> Self {
        let size = nix::pty::Winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        let pty = nix::pty::openpty(Some(&size), None).expect("openpty");
        let output = Arc::new(Mutex::new(Vec::new()));
        let mut reader = std::fs::File::from(pty.master.try_clone().expect("dup"));
        let sink = Arc::clone(&output);
        // Ends at EIO, once the CLI and this test have closed the slave.
        std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n @ 1..) = reader.read(&mut buffer) {
                sink.lock().unwrap().extend_from_slice(&buffer[..n]);
            }
        });
        Self {
            master: pty.master,
            slave: Some(pty.slave),
            output,
        }
    }

    fn mode(&self) -> Termios {
        termios::tcgetattr(self.slave.as_ref().expect("slave").as_fd()).expect("tcgetattr")
    }

    /// Starts the CLI with `args` on the slave, as its controlling terminal.
    fn spawn(&self, args: &[&str]) -> Reaped {
        let slave = self.slave.as_ref().expect("slave");
        let mut command = cli();
        command
            .args(args)
            .stdin(Stdio::from(slave.try_clone().unwrap()))
            .stdout(Stdio::from(slave.try_clone().unwrap()))
            .stderr(Stdio::from(slave.try_clone().unwrap()));
        // SAFETY: setsid and ioctl are async-signal-safe; nothing is allocated.
        unsafe {
            command.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        Reaped(Some(command.spawn().expect("spawn the CLI")))
    }

    fn type_text(&self, text: &str) {
        let mut master = std::fs::File::from(self.master.try_clone().unwrap());
        master.write_all(text.as_bytes()).expect("type");
    }

    fn text(&self) -> String {
        String::from_utf8_lossy(&self.output.lock().unwrap()).into_owned()
    }

    /// Waits until the output after byte `from` contains `needle`; returns where it ends.
    fn expect(&self, from: usize, needle: &str) -> usize {
        let deadline = Instant::now() + STEP_TIMEOUT;
        loop {
            let text = self.text();
            if let Some(at) = text.get(from..).and_then(|rest| rest.find(needle)) {
                return from + at + needle.len();
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the terminal; it shows:\n{text}\n--- agent log ---\n{}",
                agent().log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Resizes the terminal: the kernel sends the CLI (its foreground group) SIGWINCH.
    fn resize(&self, rows: u16, cols: u16) {
        let size = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize, alive across the call.
        let done = unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &size) };
        assert_eq!(done, 0, "TIOCSWINSZ: {}", std::io::Error::last_os_error());
    }

    fn wait_raw(&self) {
        let deadline = Instant::now() + STEP_TIMEOUT;
        while self.mode().local_flags.contains(LocalFlags::ICANON) {
            assert!(
                Instant::now() < deadline,
                "the CLI never put the terminal in raw mode:\n{}",
                self.text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

impl Drop for Terminal {
    fn drop(&mut self) {
        self.slave.take();
    }
}

fn same_mode(a: &Termios, b: &Termios) -> bool {
    a.input_flags == b.input_flags
        && a.output_flags == b.output_flags
        && a.control_flags == b.control_flags
        && a.local_flags == b.local_flags
        && a.control_chars == b.control_chars
}

/// Drives `sh` on a terminal: arithmetic, the size, a resize, `exit 3`, the restored mode.
fn drive_shell(terminal: &Terminal, cli: Reaped, initial: (u16, u16), before: &Termios) {
    terminal.wait_raw();
    let mut seen = terminal.expect(0, "# ");
    terminal.type_text("echo $((6*7))\r");
    seen = terminal.expect(seen, "\r\n42\r\n");
    terminal.type_text("stty size\r");
    seen = terminal.expect(seen, &format!("\r\n{} {}\r\n", initial.0, initial.1));
    terminal.resize(50, 132);
    // The resize travels SIGWINCH → CLI → agent → shim asynchronously: ask until it shows.
    let deadline = Instant::now() + STEP_TIMEOUT;
    loop {
        terminal.type_text("stty size\r");
        std::thread::sleep(Duration::from_millis(500));
        if terminal.text()[seen..].contains("\r\n50 132\r\n") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the resize never reached the guest:\n{}",
            terminal.text()
        );
    }
    terminal.type_text("exit 3\r");
    let status = cli.wait(STEP_TIMEOUT);
    assert_eq!(
        status.code(),
        Some(3),
        "{status}; the terminal shows:\n{}",
        terminal.text()
    );
    assert!(
        same_mode(before, &terminal.mode()),
        "the CLI left the terminal in another mode"
    );
}

#[test]
fn run_it_drives_a_shell_on_a_terminal() {
    let terminal = Terminal::open(24, 80);
    let before = terminal.mode();
    assert!(
        before
            .local_flags
            .contains(LocalFlags::ICANON | LocalFlags::ECHO)
    );
    let cli = terminal.spawn(&["run", "--vm", VM, "-q", "--rm", "-it", "default", "sh"]);
    drive_shell(&terminal, cli, (24, 80), &before);
}

#[test]
fn exec_it_drives_a_shell_in_a_running_container() {
    let output = cli()
        .args([
            "run", "--vm", VM, "-q", "-d", "--name", "tty-host", "default", "sleep", "600",
        ])
        .stdin(Stdio::null())
        .output()
        .expect("run -d");
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let terminal = Terminal::open(30, 100);
    let before = terminal.mode();
    let exec = terminal.spawn(&["exec", "--vm", VM, "-it", "tty-host", "sh"]);
    drive_shell(&terminal, exec, (30, 100), &before);
    let removed = cli()
        .args(["rm", "--vm", VM, "-f", "tty-host"])
        .stdin(Stdio::null())
        .output()
        .expect("rm");
    assert!(removed.status.success());
}
