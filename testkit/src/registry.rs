//! A real `docker-registry` on 127.0.0.1 with its own storage (anonymous, htpasswd or TLS),
//! `skopeo` pushes into it, and a docker `config.json` writer.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

/// Whether the registry tools are installed; tests skip loudly when not.
pub fn tools_available() -> bool {
    let ok = ["docker-registry", "skopeo"].iter().all(|tool| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    });
    if !ok {
        eprintln!(
            "SKIP: docker-registry and skopeo are needed (apt-get install docker-registry skopeo)"
        );
    }
    ok
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A `docker-registry` process with its own storage, stopped on drop.
#[derive(Debug)]
pub struct Registry {
    pub port: u16,
    child: Child,
    /// `sh` waiting for its stdin, held open by this process only, to close; then it kills the
    /// registry. A registry kept in a `static` (never dropped) is stopped this way when the
    /// test process exits, however it exits.
    watchdog: Child,
    dir: tempfile::TempDir,
    pub credentials: Option<(String, String)>,
}

/// How to start a [`Registry`].
#[derive(Debug, Default)]
pub struct RegistryOptions<'a> {
    /// htpasswd-protected with this user and password.
    pub credentials: Option<(&'a str, &'a str)>,
    /// HTTPS with this certificate and key.
    pub tls: Option<(&'a Path, &'a Path)>,
    /// Upload `Location`s relative to the host (`http.relativeurls`).
    pub relative_urls: bool,
    /// Log every request (read with [`Registry::access_log`]).
    pub access_log: bool,
}

impl Registry {
    /// Starts an anonymous registry.
    pub fn start() -> Registry {
        Registry::start_with(None)
    }

    /// Starts a registry; with `credentials`, an htpasswd-protected one.
    pub fn start_with(credentials: Option<(&str, &str)>) -> Registry {
        Registry::start_options(&RegistryOptions {
            credentials,
            ..RegistryOptions::default()
        })
    }

    /// Starts an HTTPS registry with a certificate for 127.0.0.1 signed by a fresh test CA;
    /// returns it and the CA's PEM path (the CA to trust).
    pub fn start_tls(ca_dir: &Path) -> (Registry, PathBuf) {
        let ca = ca_dir.join("ca.pem");
        let cert = ca_dir.join("cert.pem");
        let key = ca_dir.join("key.pem");
        let script = format!(
            "set -e; cd '{dir}'
            openssl req -x509 -newkey rsa:2048 -nodes -days 1 -subj /CN=gantry-test-ca \
                -keyout ca-key.pem -out ca.pem
            openssl req -newkey rsa:2048 -nodes -subj /CN=127.0.0.1 -keyout key.pem -out req.pem
            printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\n' > ext.cnf
            openssl x509 -req -in req.pem -CA ca.pem -CAkey ca-key.pem -CAcreateserial \
                -days 1 -extfile ext.cnf -out cert.pem",
            dir = ca_dir.display()
        );
        let status = Command::new("sh")
            .arg("-c")
            .arg(script)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .expect("openssl is needed for the TLS test");
        assert!(status.success(), "making the test certificates failed");
        let options = RegistryOptions {
            tls: Some((&cert, &key)),
            ..RegistryOptions::default()
        };
        (Registry::start_options(&options), ca)
    }

    /// Starts a registry as `options` say.
    pub fn start_options(options: &RegistryOptions<'_>) -> Registry {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let storage = dir.path().join("storage");
        std::fs::create_dir(&storage).unwrap();
        let mut config = format!(
            "version: 0.1\nlog:\n  level: warn\n  accesslog:\n    disabled: {}\n\
             storage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n\
             http:\n  addr: 127.0.0.1:{port}\n  secret: gantry-test-secret\n  relativeurls: {}\n",
            !options.access_log,
            storage.display(),
            options.relative_urls,
        );
        let credentials = options.credentials;
        if let Some((cert, key)) = options.tls {
            config.push_str(&format!(
                "  tls:\n    certificate: {}\n    key: {}\n",
                cert.display(),
                key.display()
            ));
        }
        if let Some((user, password)) = credentials {
            let htpasswd = dir.path().join("htpasswd");
            let output = Command::new("htpasswd")
                .args(["-Bbn", user, password])
                .output()
                .expect("htpasswd (apache2-utils) is needed for the auth test");
            assert!(output.status.success());
            std::fs::write(&htpasswd, output.stdout).unwrap();
            config.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: gantry-test\n    path: {}\n",
                htpasswd.display()
            ));
        }
        let config_path = dir.path().join("config.yml");
        std::fs::write(&config_path, config).unwrap();
        let log = std::fs::File::create(dir.path().join("registry.log")).unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("starting docker-registry");
        let watchdog = watchdog(child.id(), "KILL").expect("starting the registry's watchdog");
        let registry = Registry {
            port,
            child,
            watchdog,
            dir,
            credentials: credentials.map(|(u, p)| (u.to_string(), p.to_string())),
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "docker-registry did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        registry
    }

    /// `127.0.0.1:PORT`.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The requests logged so far (with `access_log`), as `METHOD PATH STATUS`, oldest first.
    pub fn access_log(&self) -> Vec<String> {
        let log = std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default();
        // Combined log format: `… "METHOD PATH HTTP/1.1" STATUS SIZE …`.
        log.lines()
            .filter_map(|line| {
                let (_, request) = line.split_once('"')?;
                let (request, rest) = request.split_once('"')?;
                let mut words = request.split_whitespace();
                let (method, path) = (words.next()?, words.next()?);
                let status = rest.split_whitespace().next()?;
                Some(format!("{method} {path} {status}"))
            })
            .collect()
    }

    /// Pushes image `tag` of `layout` as `repo:tag` (all platforms of an index).
    pub fn push(&self, layout: &Path, tag: &str, repo_tag: &str) {
        let mut command = Command::new("skopeo");
        command.args([
            "--insecure-policy",
            "copy",
            "--all",
            "--dest-tls-verify=false",
        ]);
        if let Some((user, password)) = &self.credentials {
            command.arg(format!("--dest-creds={user}:{password}"));
        }
        command
            .arg(format!("oci:{}:{tag}", layout.display()))
            .arg(format!("docker://{}/{repo_tag}", self.host()));
        let output = command.output().expect("running skopeo");
        assert!(
            output.status.success(),
            "skopeo copy failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = self.watchdog.kill();
        let _ = self.watchdog.wait();
    }
}

/// A `sh` that sends `signal` to `pid` once its stdin closes: when the returned child is
/// dropped or killed, or when this process exits however it exits (nothing else holds the
/// pipe's write end: std's pipes are close-on-exec).
pub fn watchdog(pid: u32, signal: &str) -> std::io::Result<Child> {
    Command::new("/bin/sh")
        .arg("-c")
        .arg(format!("read _; kill -{signal} {pid} 2>/dev/null"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
}

/// Writes a docker config.json with one credential.
pub fn docker_config(dir: &Path, host: &str, user: &str, password: &str) -> PathBuf {
    use base64::Engine as _;
    let path = dir.join("config.json");
    let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
    let mut file = std::fs::File::create(&path).unwrap();
    write!(file, "{}", json!({"auths": {host: {"auth": auth}}})).unwrap();
    path
}
