//! `bitferry agent --config FILE --check`: validate everything the agent would use, without
//! starting it (like `nginx -t`). Each problem is one line; the check fails if there is any.
//!
//! What is checked, section by section of the config (docs/operations.md §Checking a config):
//! - the file itself: TOML, known keys, the rules `Config::load` enforces;
//! - `[tls]`: each file readable, then the identity as the agent loads it (key matches the
//!   certificate, certificate signed by `tls.ca`, not expired, client and server usage);
//! - `store`: a directory the agent can write (or can create);
//! - `control`: its directory writable or creatable, the path short enough for a unix socket,
//!   and not something other than a socket (the agent would delete it);
//! - `listen` and `metrics`: addresses this host can bind (UDP and TCP);
//! - `[[reference]]`: the live image and the manifest or backup exist and are the right kind of
//!   file, the manifest's header checks out, fits the granularity, and was not made from the
//!   live image itself;
//! - `[[expect]]`: peer names that a certificate can carry;
//! - `[transport]`: keep-alive below the idle timeout, non-zero stall limits;
//! - the descriptor limit: whether `control_limits.max_connections` would be lowered.
//!
//! Notes (printed, not failures) say what is fine now but worth knowing, such as an agent
//! already running on this config.

use crate::daemon::config::{Config, Reference};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;

/// The outcome of a check.
#[derive(Debug, Default)]
pub struct Report {
    /// Each a reason the agent would fail, or would run but not do what the config says.
    pub problems: Vec<String>,
    /// Worth knowing, not wrong.
    pub notes: Vec<String>,
}

impl Report {
    fn problem(&mut self, s: impl Into<String>) {
        self.problems.push(s.into());
    }

    fn note(&mut self, s: impl Into<String>) {
        self.notes.push(s.into());
    }
}

/// Check the config file at `path`.
pub fn check(path: &Path) -> Report {
    let mut r = Report::default();
    let config = match Config::load(path) {
        Ok(c) => c,
        Err(e) => {
            r.problem(crate::exit::describe(&anyhow::Error::new(e)));
            return r;
        }
    };
    let running = agent_running(&config.control);
    if running {
        r.note(format!(
            "an agent is running on control socket {} (the check does not disturb it; a \
             second agent on this config would refuse to start)",
            config.control.display()
        ));
    }
    tls(&config, &mut r);
    store(&config.store, &mut r);
    control(&config.control, running, &mut r);
    bind_udp("listen", config.listen, running, &mut r);
    if let Some(m) = config.metrics {
        bind_tcp("metrics", m, running, &mut r);
    }
    references(&config.reference, &mut r);
    expectations(&config, &mut r);
    transport(&config, &mut r);
    descriptors(&config, &mut r);
    // `[[qemu]]` sections (QMP sockets) are checked here once the config has them.
    r
}

/// The problems of the `[[reference]]` sections alone: what the agent warns about at start-up
/// (a reference that is wrong now is only needed when a bitmap is lost, so it does not stop
/// the agent).
pub fn reference_problems(references: &[Reference]) -> Vec<String> {
    let mut r = Report::default();
    self::references(references, &mut r);
    r.problems
}

fn agent_running(control: &Path) -> bool {
    std::os::unix::net::UnixStream::connect(control).is_ok()
}

/// `what PATH: reason`, the shape of every file problem.
fn at(what: &str, path: &Path, reason: impl std::fmt::Display) -> String {
    format!("{what} {}: {reason}", path.display())
}

/// Why `path` cannot be read as a regular file, if it cannot.
fn unreadable_file(path: &Path) -> Option<String> {
    match std::fs::File::open(path).and_then(|f| f.metadata()) {
        Err(e) => Some(os_reason(&e)),
        Ok(m) if m.is_dir() => Some("is a directory, not a file".into()),
        Ok(_) => None,
    }
}

fn os_reason(e: &std::io::Error) -> String {
    match e.kind() {
        std::io::ErrorKind::NotFound => "does not exist".into(),
        std::io::ErrorKind::PermissionDenied => {
            "cannot be read by this user (permission denied)".into()
        }
        _ => e.to_string(),
    }
}

fn tls(c: &Config, r: &mut Report) {
    let files = [
        ("tls.ca", &c.tls.ca, "the cluster CA (bitferry cert init)"),
        (
            "tls.cert",
            &c.tls.cert,
            "this host's certificate (bitferry cert issue)",
        ),
        (
            "tls.key",
            &c.tls.key,
            "this host's key (bitferry cert issue)",
        ),
    ];
    let mut all = true;
    for (what, path, is) in files {
        if let Some(why) = unreadable_file(path) {
            r.problem(at(what, path, format!("{why}; it should hold {is}")));
            all = false;
        }
    }
    if all {
        if let Err(e) = crate::transport::TlsIdentity::load(&c.tls.ca, &c.tls.cert, &c.tls.key) {
            r.problem(format!("[tls]: {e}"));
        }
        use std::os::unix::fs::PermissionsExt;
        if let Ok(m) = std::fs::metadata(&c.tls.key)
            && m.permissions().mode() & 0o077 != 0
        {
            r.note(at(
                "tls.key",
                &c.tls.key,
                format!(
                    "is readable by other users (mode {:04o}); chmod 600 it",
                    m.permissions().mode() & 0o7777
                ),
            ));
        }
    }
}

/// Whether this process may write into directory `dir` (create and remove entries).
fn writable_dir(dir: &Path) -> Result<(), String> {
    use rustix::fs::{Access, access};
    access(dir, Access::WRITE_OK | Access::EXEC_OK)
        .map_err(|e| format!("is not writable by this user ({e})"))
}

/// Check that `path` is a writable directory, or that the agent could create it.
fn dir_usable(what: &str, path: &Path, r: &mut Report) {
    match std::fs::metadata(path) {
        Ok(m) if !m.is_dir() => r.problem(at(what, path, "exists but is not a directory")),
        Ok(_) => {
            if let Err(why) = writable_dir(path) {
                r.problem(at(what, path, why));
            }
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            // The agent creates it: the nearest existing ancestor must let it.
            let mut up = path.parent();
            while let Some(p) = up {
                if p.as_os_str().is_empty() {
                    break;
                }
                match std::fs::metadata(p) {
                    Ok(m) if m.is_dir() => {
                        if let Err(why) = writable_dir(p) {
                            r.problem(at(
                                what,
                                path,
                                format!("does not exist, and {} {why}", p.display()),
                            ));
                        }
                        return;
                    }
                    Ok(_) => {
                        r.problem(at(
                            what,
                            path,
                            format!("cannot be created: {} is not a directory", p.display()),
                        ));
                        return;
                    }
                    Err(_) => up = p.parent(),
                }
            }
        }
        Err(e) => r.problem(at(what, path, os_reason(&e))),
    }
}

fn store(path: &Path, r: &mut Report) {
    dir_usable("store", path, r);
}

fn control(path: &Path, running: bool, r: &mut Report) {
    // sun_path holds 108 bytes including the terminating NUL.
    let len = path.as_os_str().len();
    if len > 107 {
        r.problem(at(
            "control",
            path,
            format!("is {len} bytes long; a unix socket path may have at most 107"),
        ));
    }
    if let Some(dir) = path.parent() {
        dir_usable("control directory", dir, r);
    }
    use std::os::unix::fs::FileTypeExt;
    match std::fs::symlink_metadata(path) {
        Ok(m) if m.file_type().is_socket() || running => {}
        Ok(_) => r.problem(at(
            "control",
            path,
            "exists and is not a socket; the agent would delete it to bind its socket",
        )),
        Err(_) => {}
    }
}

fn in_use(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::AddrInUse
}

fn bind_problem(what: &str, addr: SocketAddr, proto: &str, e: &std::io::Error) -> String {
    let hint = match e.kind() {
        std::io::ErrorKind::AddrInUse => "another process uses it",
        std::io::ErrorKind::AddrNotAvailable => "it is not an address of this host",
        std::io::ErrorKind::PermissionDenied => "ports below 1024 need privileges",
        _ => "",
    };
    let sep = if hint.is_empty() { "" } else { "; " };
    format!("{what} {addr}: cannot bind {proto} ({e}){sep}{hint}")
}

fn bind_udp(what: &str, addr: SocketAddr, running: bool, r: &mut Report) {
    match std::net::UdpSocket::bind(addr) {
        Ok(_) => {}
        Err(e) if in_use(&e) && running => {}
        Err(e) => r.problem(bind_problem(what, addr, "UDP", &e)),
    }
}

fn bind_tcp(what: &str, addr: SocketAddr, running: bool, r: &mut Report) {
    match std::net::TcpListener::bind(addr) {
        Ok(_) => {}
        Err(e) if in_use(&e) && running => {}
        Err(e) => r.problem(bind_problem(what, addr, "TCP", &e)),
    }
}

/// Check an image path: it must open for reading and be a raw file or a block device.
fn image_ok(what: &str, path: &Path, r: &mut Report) -> bool {
    let f = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) => {
            r.problem(at(what, path, os_reason(&e)));
            return false;
        }
    };
    // Seeking to the end of a directory "succeeds" with a nonsense size.
    if f.metadata().is_ok_and(|m| m.is_dir()) {
        r.problem(at(
            what,
            path,
            "is a directory; give the image itself (a raw file or a block device)",
        ));
        return false;
    }
    match crate::rebuild::file_size(&f) {
        Ok(_) => true,
        Err(e) => {
            r.problem(at(what, path, e));
            false
        }
    }
}

fn references(refs: &[Reference], r: &mut Report) {
    let mut seen: BTreeMap<&str, usize> = BTreeMap::new();
    for (i, rf) in refs.iter().enumerate() {
        let n = seen.entry(rf.disk.as_str()).or_insert(0);
        *n += 1;
        if *n == 2 {
            r.problem(format!(
                "[[reference]] #{} for disk {}: the disk already has a [[reference]]; the agent \
                 uses only the first",
                i + 1,
                rf.disk
            ));
        }
        let what = |k: &str| format!("[[reference]] {} {k}", rf.disk);
        if let Some(g) = rf.granularity
            && let Err(e) = wire::Geometry::new(g, g)
        {
            r.problem(format!("{}: {e}", what("granularity")));
        }
        if rf.rate == Some(0) {
            r.problem(format!(
                "{}: 0 bytes per second would never finish; leave it out for no limit",
                what("rate")
            ));
        }
        let live = image_ok(&what("image"), &rf.image, r);
        if let Some(b) = &rf.backup
            && image_ok(&what("backup"), b, r)
            && live
            && same_file(b, &rf.image)
        {
            r.problem(at(
                &what("backup"),
                b,
                "is the live image itself; give the backup image",
            ));
        }
        if let Some(m) = &rf.manifest {
            manifest(&what("manifest"), m, rf, live, r);
        }
    }
}

fn same_file(a: &Path, b: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    match (std::fs::metadata(a), std::fs::metadata(b)) {
        (Ok(a), Ok(b)) => (a.dev(), a.ino()) == (b.dev(), b.ino()),
        _ => false,
    }
}

fn manifest(what: &str, path: &Path, rf: &Reference, live: bool, r: &mut Report) {
    use crate::rebuild::manifest;
    let header = match manifest::read_header(path) {
        Ok(h) => h,
        Err(e) => {
            // RebuildError names the path itself.
            r.problem(format!(
                "{what}: {}",
                crate::exit::describe(&anyhow::Error::new(e))
            ));
            return;
        }
    };
    if let Some(g) = rf.granularity
        && g != header.geometry.granularity()
    {
        r.problem(format!(
            "{what} {}: has granularity {}, the reference asks for {}",
            path.display(),
            crate::units::human_bytes(header.geometry.granularity()),
            crate::units::human_bytes(g)
        ));
    }
    if !live {
        return;
    }
    if let Ok(live) = std::fs::File::open(&rf.image)
        && let Err(e) =
            manifest::refuse_same_image(path, header.identity.as_ref(), &rf.image, &live)
    {
        r.problem(format!("{what}: {e}"));
    }
    if let Ok(size) = std::fs::File::open(&rf.image)
        .and_then(|f| crate::rebuild::file_size(&f))
        .map_err(|_| ())
        && size != header.geometry.size()
    {
        r.note(format!(
            "{what} {}: describes {}, the live image {} has {} (a rebuild marks every block \
             past the shorter one dirty)",
            path.display(),
            crate::units::human_bytes(header.geometry.size()),
            rf.image.display(),
            crate::units::human_bytes(size)
        ));
    }
}

fn expectations(c: &Config, r: &mut Report) {
    for e in &c.expect {
        if let Some(from) = &e.from
            && let Err(err) = crate::cert::check_name(from)
        {
            r.problem(format!(
                "[[expect]] {} from: {err} (no certificate can carry that name)",
                e.disk
            ));
        }
    }
}

fn transport(c: &Config, r: &mut Report) {
    let t = &c.transport;
    if t.idle_timeout_ms > 0 && t.keep_alive_ms >= t.idle_timeout_ms {
        r.problem(format!(
            "[transport] keep_alive_ms ({}) must be below idle_timeout_ms ({}), or idle \
             connections time out between keep-alives",
            t.keep_alive_ms, t.idle_timeout_ms
        ));
    }
    for (k, v) in [
        ("frame_stall_ms", t.frame_stall_ms),
        ("switchover_silence_ms", t.switchover_silence_ms),
    ] {
        if v == 0 {
            r.problem(format!(
                "[transport] {k} is 0: every migration would fail at once as stalled"
            ));
        }
    }
}

fn descriptors(c: &Config, r: &mut Report) {
    use crate::daemon::limits;
    let (nofile, _) = limits::raise_nofile();
    let configured = c.control_limits.max_connections;
    let fits = limits::control_connections(nofile.soft, configured);
    if fits < configured {
        r.note(format!(
            "control_limits.max_connections {configured} would be lowered to {fits}: the \
             descriptor limit here is {} (raise LimitNOFILE, docs/operations.md §Limits)",
            nofile.soft.map_or("unlimited".into(), |l| l.to_string())
        ));
    }
}
