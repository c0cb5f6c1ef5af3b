//! Helpers shared by the end-to-end tests.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Path of the `bitferry` binary built next to this test binary (`<target>/<profile>/bitferry`).
/// The README's test command builds it first (`cargo build --bin bitferry`).
pub fn bitferry_path() -> PathBuf {
    let exe = std::env::current_exe().expect("current_exe");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("test binary lives in <target>/<profile>/deps");
    let bin = profile_dir.join("bitferry");
    assert!(
        bin.exists(),
        "{} not found: run `cargo build --bin bitferry` before the tests (see README.md)",
        bin.display()
    );
    bin
}

/// A `bitferry` command with logs quiet.
pub fn bitferry() -> Command {
    let mut c = Command::new(bitferry_path());
    c.env_remove("BITFERRY_STORE").env("BITFERRY_LOG", "warn");
    c
}

/// Run `bitferry --store STORE ARGS…` and return its output.
pub fn run_in(store: &std::path::Path, args: &[&str]) -> Output {
    bitferry()
        .arg("--store")
        .arg(store)
        .args(args)
        .output()
        .expect("spawn bitferry")
}

/// Like [`run_in`] but the command must succeed; returns stdout parsed as JSON (`--json` added).
pub fn json_in(store: &std::path::Path, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["--json"];
    full.extend_from_slice(args);
    let out = run_in(store, &full);
    assert!(
        out.status.success(),
        "bitferry {args:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stderr),
        String::from_utf8_lossy(&out.stdout)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "bitferry {args:?}: stdout is not JSON ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
}

/// How many blocks set in `truth` the extents of a `show` reply (`[{"offset", "length"}]`) do
/// not cover: 0 means the reported bitmap is a superset of `truth`.
pub fn blocks_missing(extents: &[serde_json::Value], truth: &wire::Bitmap) -> u64 {
    let mut got = wire::Bitmap::new(truth.geometry());
    for e in extents {
        got.mark(e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap())
            .unwrap();
    }
    let mut lost = truth.clone();
    lost.subtract(&got).unwrap();
    lost.count()
}

/// How many descriptors process `pid` holds (its `/proc/PID/fd` entries).
pub fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// A seed from `BITFERRY_TEST_SEED` or fresh, printed so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("BITFERRY_TEST_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    eprintln!("{test}: seed {s} (replay with BITFERRY_TEST_SEED={s})");
    s
}

/// Transport limits and flush interval written into an e2e agent's config.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// `transport.idle_timeout_ms`.
    pub idle_ms: u64,
    /// `transport.keep_alive_ms`.
    pub keep_alive_ms: u64,
    /// `transport.frame_stall_ms`.
    pub frame_stall_ms: u64,
    /// `transport.switchover_silence_ms`.
    pub silence_ms: u64,
    /// `flush_interval_ms`.
    pub flush_ms: u64,
}

impl Limits {
    /// What [`AgentProc::start`] writes: short, so a dead peer is noticed within a test.
    pub const E2E: Limits = Limits {
        idle_ms: 3000,
        keep_alive_ms: 500,
        frame_stall_ms: 2000,
        silence_ms: 4000,
        flush_ms: 100,
    };
}

/// The `agent.toml` of an e2e agent named `name`: loopback listen, store and control socket
/// beside the file, the certificate `cert issue` made for `name` under the CA in `ca`, the
/// `limits` (`None`: the agent's defaults), and `extra` (top-level keys or tables) before `[tls]`.
pub fn agent_toml(name: &str, ca: &std::path::Path, limits: Option<Limits>, extra: &str) -> String {
    let mut c =
        String::from("listen = \"127.0.0.1:0\"\nstore = \"store\"\ncontrol = \"control.sock\"\n");
    if let Some(l) = limits {
        c += &format!("flush_interval_ms = {}\n", l.flush_ms);
    }
    c += &format!(
        "{extra}\n[tls]\nca = \"{}\"\ncert = \"{name}.pem\"\nkey = \"{name}.key\"\n",
        ca.join("ca.pem").display()
    );
    if let Some(l) = limits {
        c += &format!(
            "[transport]\nidle_timeout_ms = {}\nkeep_alive_ms = {}\nframe_stall_ms = {}\n\
             switchover_silence_ms = {}\n",
            l.idle_ms, l.keep_alive_ms, l.frame_stall_ms, l.silence_ms
        );
    }
    c
}

/// A running `bitferry agent`, killed when dropped.
pub struct AgentProc {
    /// The child process.
    pub child: std::process::Child,
    /// Its control socket.
    pub control: PathBuf,
    /// Its store directory.
    pub store: PathBuf,
    /// Its directory (config, certificate, log).
    pub dir: PathBuf,
}

impl AgentProc {
    /// Start an agent named `name` in `dir`, with a certificate from the cluster CA in `ca`
    /// (created by [`cluster_ca`]) and `extra_toml` appended to its config; waits until its
    /// control socket answers.
    pub fn start(
        dir: &std::path::Path,
        name: &str,
        ca: &std::path::Path,
        extra_toml: &str,
    ) -> AgentProc {
        Self::start_wrapped(dir, name, ca, extra_toml, &[])
    }

    /// Like [`AgentProc::start`], but run the agent through `wrapper` (a program and its
    /// arguments that execs the rest of its command line in place, such as
    /// `prlimit --nofile=128:128 --`), so the child's pid is still the agent's.
    pub fn start_wrapped(
        dir: &std::path::Path,
        name: &str,
        ca: &std::path::Path,
        extra_toml: &str,
        wrapper: &[&str],
    ) -> AgentProc {
        std::fs::create_dir_all(dir).unwrap();
        let config = dir.join("agent.toml");
        let control = dir.join("control.sock");
        let store = dir.join("store");
        if !dir.join(format!("{name}.pem")).exists() {
            let out = bitferry()
                .args(["cert", "issue", "--ca"])
                .arg(ca)
                .args(["--name", name, "--out"])
                .arg(dir)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "cert issue: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        if !config.exists() {
            std::fs::write(&config, agent_toml(name, ca, Some(Limits::E2E), extra_toml)).unwrap();
        }
        let log = std::fs::File::create(dir.join("agent.log")).unwrap();
        let mut cmd = match wrapper.split_first() {
            None => bitferry(),
            Some((prog, args)) => {
                let mut c = Command::new(prog);
                c.args(args).arg(bitferry_path());
                c.env_remove("BITFERRY_STORE");
                c
            }
        };
        let child = cmd
            .env("BITFERRY_LOG", "info")
            .arg("agent")
            .arg("--config")
            .arg(&config)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("spawn agent");
        let mut a = AgentProc {
            child,
            control,
            store,
            dir: dir.to_path_buf(),
        };
        a.wait_ready();
        a
    }

    /// The QUIC address the agent listens on, read from its log ("agent ready … listen=ADDR").
    pub fn listen_addr(&self) -> String {
        let log = std::fs::read_to_string(self.dir.join("agent.log")).unwrap();
        let line = log
            .lines()
            .find(|l| l.contains("agent ready"))
            .expect("agent ready line");
        let at = line.find("listen=").expect("listen= in the ready line") + "listen=".len();
        line[at..].split_whitespace().next().unwrap().to_string()
    }

    /// The agent's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    fn wait_ready(&mut self) {
        let t = std::time::Instant::now();
        while t.elapsed() < std::time::Duration::from_secs(20) {
            if let Some(st) = self.child.try_wait().unwrap() {
                panic!("agent exited early ({st}): {}", self.log());
            }
            if std::os::unix::net::UnixStream::connect(&self.control).is_ok()
                && self.log().contains("agent ready")
            {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        panic!("agent did not come up within 20 s");
    }

    /// Run `bitferry --control SOCKET ARGS…`.
    pub fn cli(&self, args: &[&str]) -> Output {
        bitferry()
            .arg("--control")
            .arg(&self.control)
            .args(args)
            .output()
            .expect("spawn bitferry")
    }

    /// Like [`AgentProc::cli`] with `--json`; must succeed.
    pub fn json(&self, args: &[&str]) -> serde_json::Value {
        let mut full = vec!["--json"];
        full.extend_from_slice(args);
        let out = self.cli(&full);
        assert!(
            out.status.success(),
            "bitferry --control {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stderr),
            String::from_utf8_lossy(&out.stdout)
        );
        serde_json::from_slice(&out.stdout).expect("JSON on stdout")
    }

    /// SIGKILL and reap.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let _ = std::process::Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        self.child.wait().unwrap()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Create a cluster CA in `dir` with `bitferry cert init`.
pub fn cluster_ca(dir: &std::path::Path) -> PathBuf {
    let out = bitferry()
        .args(["cert", "init", "--dir"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "cert init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir.to_path_buf()
}
