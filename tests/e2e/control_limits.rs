//! The control socket under resource exhaustion (issue 11, F2 and F3): more idle connections
//! than the agent has descriptors for, an agent that runs out of descriptors under its feet,
//! silent and slow clients, and many clients each sending a huge unterminated line. The agent
//! must refuse clearly, not spin, not flood its log, not balloon, and recover.

use crate::common::{AgentProc, cluster_ca, open_fds};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// User + system CPU time of `pid`, in seconds (/proc/PID/stat fields 14 and 15).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // The command name may hold spaces; the fields after it are space-separated.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    ticks as f64 / clock_ticks()
}

fn clock_ticks() -> f64 {
    std::process::Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// A `Vm…:` line of /proc/PID/status, in bytes.
fn vm_bytes(pid: u32, key: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status
        .lines()
        .find(|l| l.starts_with(key))
        .unwrap_or_else(|| panic!("no {key} in /proc/{pid}/status"));
    let kb: u64 = line[key.len()..]
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    kb * 1024
}

fn log_bytes(a: &AgentProc) -> u64 {
    std::fs::metadata(a.dir.join("agent.log"))
        .map(|m| m.len())
        .unwrap_or(0)
}

/// CPU seconds the agent used and bytes its log grew by over `window`.
fn measure(a: &AgentProc, window: Duration) -> (f64, u64) {
    let pid = a.child.id();
    let (c0, l0) = (cpu_seconds(pid), log_bytes(a));
    std::thread::sleep(window);
    (cpu_seconds(pid) - c0, log_bytes(a).saturating_sub(l0))
}

/// Whatever the agent already wrote to `c`, without waiting.
fn pending_text(c: &mut UnixStream) -> String {
    c.set_nonblocking(true).unwrap();
    let mut buf = vec![0u8; 4096];
    let text = match c.read(&mut buf) {
        Ok(n) => String::from_utf8_lossy(&buf[..n]).into_owned(),
        Err(_) => String::new(),
    };
    c.set_nonblocking(false).unwrap();
    text
}

/// Read one response line (or until EOF / error / timeout).
fn read_line(c: &mut UnixStream, timeout: Duration) -> String {
    c.set_read_timeout(Some(timeout)).unwrap();
    let mut out = Vec::new();
    let mut b = [0u8; 1];
    while let Ok(1) = c.read(&mut b) {
        out.push(b[0]);
        if b[0] == b'\n' {
            break;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `bitferry status` through the control socket succeeds within `within`.
fn status_works_within(a: &AgentProc, within: Duration) -> bool {
    let t = Instant::now();
    loop {
        let out = a.cli(&["--json", "status"]);
        if out.status.success() {
            return true;
        }
        if t.elapsed() > within {
            eprintln!(
                "status still failing: {}{}",
                String::from_utf8_lossy(&out.stderr),
                String::from_utf8_lossy(&out.stdout)
            );
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// F2: the agent runs with only 128 descriptors and 200 clients connect and stay silent. The
/// agent keeps a reserve of descriptors for its store and QUIC, refuses the connections past
/// its cap with a one-line reason, does not spin or flood its log, and serves new clients once
/// the idle ones go away.
#[test]
fn more_idle_connections_than_descriptors_are_refused_without_spinning() {
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let a = AgentProc::start_wrapped(
        &dir.path().join("a"),
        "host-a",
        &ca,
        "",
        &["prlimit", "--nofile=128:128", "--"],
    );
    let mut conns: Vec<UnixStream> = (0..200)
        .map(|_| UnixStream::connect(&a.control).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (cpu, log) = measure(&a, Duration::from_secs(2));
    let refusals: Vec<String> = conns
        .iter_mut()
        .map(pending_text)
        .filter(|t| !t.is_empty())
        .collect();
    eprintln!(
        "200 idle connections at 128 descriptors: agent CPU {cpu:.2} s in 2 s, log +{log} bytes, \
         {} refused; first refusal: {:?}",
        refusals.len(),
        refusals.first()
    );
    assert!(cpu < 0.3, "the agent spins: {cpu:.2} s of CPU in 2 s");
    assert!(log < 16 * 1024, "the log grew by {log} bytes in 2 s");
    assert!(
        refusals.len() >= 50
            && refusals
                .iter()
                .all(|r| r.contains("too many control connections") && r.contains("\"ok\":false")),
        "connections past the cap must get a one-line refusal: {refusals:?}"
    );
    // The CLI reports the refusal itself, at once, not a broken pipe or a timeout.
    let t = Instant::now();
    let out = a.cli(&["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && err.contains("too many control connections"),
        "{err}"
    );
    assert!(t.elapsed() < Duration::from_secs(5), "{:?}", t.elapsed());
    drop(conns);
    assert!(
        status_works_within(&a, Duration::from_secs(5)),
        "the agent did not recover"
    );
    eprintln!("agent log after the test: {} bytes", log_bytes(&a));
    assert!(
        a.log().contains("descriptor limit"),
        "the start-up log names the descriptor limit: {}",
        a.log()
    );
}

/// F2: the agent's descriptors run out under its feet (its limit is lowered while it runs, as
/// when something else in it uses them up). `accept` fails with EMFILE; the agent backs off
/// instead of spinning, logs rarely, answers clients with the real cause, reports store
/// failures as "Too many open files", and recovers once descriptors are free again.
#[test]
fn running_out_of_descriptors_backs_off_and_names_the_cause() {
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let a = AgentProc::start(&dir.path().join("a"), "host-a", &ca, "");
    a.json(&[
        "bitmap",
        "create",
        "--disk",
        "vm1/vda",
        "--size",
        "1G",
        "--granularity",
        "64K",
    ]);
    let pid = a.child.id();
    // A client that is already connected when the descriptors run out.
    let mut probe = UnixStream::connect(&a.control).unwrap();
    probe.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    assert!(read_line(&mut probe, Duration::from_secs(5)).contains("\"ok\":true"));
    std::thread::sleep(Duration::from_millis(300));
    let limit = open_fds(pid) + 6;
    let set = |soft: &str| {
        let st = std::process::Command::new("prlimit")
            .args(["--pid", &pid.to_string(), &format!("--nofile={soft}:")])
            .status()
            .unwrap();
        assert!(st.success());
    };
    set(&limit.to_string());
    let lowered = Instant::now();
    // A mark to flush: every flush fails now, and the log must say why, not every tick.
    probe
        .write_all(b"{\"cmd\":\"mark\",\"disk\":\"vm1/vda\",\"ranges\":[[0,1]]}\n")
        .unwrap();
    assert!(read_line(&mut probe, Duration::from_secs(5)).contains("\"ok\":true"));
    let mut conns: Vec<UnixStream> = (0..100)
        .map(|_| UnixStream::connect(&a.control).unwrap())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let (cpu, log) = measure(&a, Duration::from_secs(2));
    let answers: Vec<String> = conns
        .iter_mut()
        .map(pending_text)
        .filter(|t| !t.is_empty())
        .collect();
    // A store operation that needs a descriptor now fails, and says why.
    probe
        .write_all(b"{\"cmd\":\"verify\",\"disk\":\"vm1/vda\"}\n")
        .unwrap();
    let verify = read_line(&mut probe, Duration::from_secs(5));
    eprintln!(
        "100 connections with {limit} descriptors: agent CPU {cpu:.2} s in 2 s, log +{log} \
         bytes, {} answered; first answer: {:?}; verify: {verify}",
        answers.len(),
        answers.first()
    );
    assert!(cpu < 0.3, "the agent spins: {cpu:.2} s of CPU in 2 s");
    assert!(log < 16 * 1024, "the log grew by {log} bytes in 2 s");
    assert!(
        !answers.is_empty()
            && answers
                .iter()
                .all(|r| r.contains("Too many open files") && r.contains("\"ok\":false")),
        "clients the agent cannot serve are told why: {answers:?}"
    );
    assert!(
        verify.contains("\"ok\":false") && verify.contains("Too many open files"),
        "{verify}"
    );
    let agent_log = a.log();
    let flush_failures: Vec<&str> = agent_log
        .lines()
        .filter(|l| l.contains("flushing the store failed"))
        .collect();
    // Flushes fail at every 100 ms tick; one line per 5 s is logged.
    let allowed = lowered.elapsed().as_secs() as usize / 5 + 1;
    assert!(
        !flush_failures.is_empty()
            && flush_failures.len() <= allowed
            && flush_failures
                .iter()
                .all(|l| l.contains("Too many open files")),
        "flush failures are logged rarely and with their cause: {flush_failures:?}"
    );
    assert!(
        agent_log
            .lines()
            .any(|l| l.contains("cannot accept") && l.contains("Too many open files")),
        "the log names the cause: {agent_log}"
    );
    let out = a.cli(&["status"]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.code() == Some(1) && err.contains("out of file descriptors"),
        "{err}"
    );
    drop(conns);
    set("20000");
    assert!(
        status_works_within(&a, Duration::from_secs(5)),
        "the agent did not recover"
    );
    probe
        .write_all(b"{\"cmd\":\"verify\",\"disk\":\"vm1/vda\"}\n")
        .unwrap();
    let verify = read_line(&mut probe, Duration::from_secs(5));
    assert!(verify.contains("\"ok\":true"), "{verify}");
    eprintln!("agent log after the test: {} bytes", log_bytes(&a));
}

/// F2: a client that connects and says nothing is disconnected after the idle timeout; one
/// that starts a request and never finishes it (slowloris, even trickling a byte at a time)
/// gets an error after the request timeout and is disconnected.
#[test]
fn silent_and_slow_control_connections_are_closed() {
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let a = AgentProc::start(
        &dir.path().join("a"),
        "host-a",
        &ca,
        "[control_limits]\nidle_timeout_ms = 500\nrequest_timeout_ms = 1000\n",
    );
    // Silent from the start.
    let mut silent = UnixStream::connect(&a.control).unwrap();
    // One request, then silence: served, then closed.
    let mut served = UnixStream::connect(&a.control).unwrap();
    served.write_all(b"{\"cmd\":\"status\"}\n").unwrap();
    assert!(read_line(&mut served, Duration::from_secs(5)).contains("\"ok\":true"));
    let t = Instant::now();
    let got = read_line(&mut silent, Duration::from_secs(5));
    let idle_closed = t.elapsed();
    let got_served = read_line(&mut served, Duration::from_secs(5));
    eprintln!("silent connection closed after {idle_closed:?}");
    assert!(
        got.is_empty() && idle_closed < Duration::from_secs(3),
        "a silent connection was not closed ({idle_closed:?}, {got:?})"
    );
    assert!(got_served.is_empty(), "{got_served:?}");
    assert!(matches!(silent.read(&mut [0u8; 1]), Ok(0)), "not at EOF");

    // Slowloris: a byte every 100 ms never completes the line.
    let mut slow = UnixStream::connect(&a.control).unwrap();
    let mut trickle = slow.try_clone().unwrap();
    let t = Instant::now();
    let writer = std::thread::spawn(move || {
        let _ = trickle.write_all(b"{\"cmd\":");
        for _ in 0..50 {
            std::thread::sleep(Duration::from_millis(100));
            if trickle.write_all(b" ").is_err() {
                break;
            }
        }
    });
    let answer = read_line(&mut slow, Duration::from_secs(5));
    let slow_closed = t.elapsed();
    eprintln!("slow request answered after {slow_closed:?}: {answer}");
    assert!(
        answer.contains("\"ok\":false") && answer.contains("not complete"),
        "{answer:?}"
    );
    assert!(slow_closed < Duration::from_secs(3), "{slow_closed:?}");
    writer.join().unwrap();
    assert!(status_works_within(&a, Duration::from_secs(2)));
}

/// F3: 24 clients each send a 15 MiB line and never end it. Before, every connection could
/// buffer 16 MiB (24 × 15 MiB resident); now all connections together buffer at most
/// `max_buffered_bytes` (64 MiB by default), the clients past it get a one-line refusal, and a
/// small request still goes through while the big ones are held.
#[test]
fn huge_unterminated_lines_are_bounded_for_the_whole_agent() {
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let a = AgentProc::start(&dir.path().join("a"), "host-a", &ca, "");
    let pid = a.child.id();
    std::thread::sleep(Duration::from_millis(300));
    let base = vm_bytes(pid, "VmRSS:");
    const LINE: usize = 15 << 20;
    let clients: Vec<_> = (0..24)
        .map(|_| {
            let path = a.control.clone();
            std::thread::spawn(move || {
                let mut c = UnixStream::connect(path).unwrap();
                let chunk = vec![b'x'; 1 << 20];
                let mut sent = 0;
                while sent < LINE {
                    if c.write_all(&chunk).is_err() {
                        break;
                    }
                    sent += chunk.len();
                }
                let answer = read_line(&mut c, Duration::from_secs(2));
                (c, sent, answer)
            })
        })
        .collect();
    let mut peak = 0;
    while !clients.iter().all(|c| c.is_finished()) {
        peak = peak.max(vm_bytes(pid, "VmRSS:"));
        std::thread::sleep(Duration::from_millis(20));
    }
    let results: Vec<_> = clients.into_iter().map(|c| c.join().unwrap()).collect();
    // A small request is served while the unfinished lines are still held.
    let status_ok = a.cli(&["--json", "status"]).status.success();
    let hwm = vm_bytes(pid, "VmHWM:");
    peak = peak.max(vm_bytes(pid, "VmRSS:"));
    let refused: Vec<&String> = results
        .iter()
        .map(|(_, _, answer)| answer)
        .filter(|a| !a.is_empty())
        .collect();
    let sent: usize = results.iter().map(|(_, s, _)| s).sum();
    eprintln!(
        "24 × 15 MiB unterminated: RSS {} MiB before, peak {} MiB (VmHWM {} MiB); {} MiB sent; \
         {} refused; first refusal: {:?}",
        base >> 20,
        peak >> 20,
        hwm >> 20,
        sent >> 20,
        refused.len(),
        refused.first()
    );
    assert!(
        hwm.saturating_sub(base) < 128 << 20,
        "the agent grew by {} MiB",
        (hwm - base) >> 20
    );
    assert!(
        !refused.is_empty()
            && refused
                .iter()
                .all(|r| r.contains("\"ok\":false") && r.contains("max_buffered_bytes")),
        "{refused:?}"
    );
    assert!(status_ok, "a small request was refused during the flood");
    drop(results);
    assert!(status_works_within(&a, Duration::from_secs(2)));
}

/// F2: when the destination cannot read a disk's retirement record (out of descriptors in the
/// finding; a damaged record here, which takes the same path), it refuses every offer for the
/// disk — and the source is told that, not "older than epoch 18446744073709551615".
#[test]
fn an_unreadable_retirement_record_is_named_in_the_refusal() {
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let src = AgentProc::start(&dir.path().join("a"), "host-a", &ca, "");
    let dst = AgentProc::start(&dir.path().join("b"), "host-b", &ca, "");
    let disk = "vm/d";
    src.json(&[
        "bitmap",
        "create",
        "--disk",
        disk,
        "--size",
        "1G",
        "--granularity",
        "64K",
    ]);
    dst.json(&["expect", "--disk", disk, "--from", "host-a"]);
    let name = agent::store::file_name(&wire::DiskId::new(disk).unwrap());
    let record = format!("{}.retired", name.strip_suffix(".bfb").unwrap());
    std::fs::write(dst.store.join(record), b"not a retirement record\n").unwrap();
    src.json(&[
        "migrate",
        "start",
        "--disk",
        disk,
        "--to",
        &dst.listen_addr(),
    ]);
    let t = Instant::now();
    let st = loop {
        let st = src.json(&["migrate", "status", "--disk", disk]);
        if st["finished"] == true {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "not finished: {st}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = st["error"].as_str().unwrap_or_default().to_string();
    eprintln!("source sees: {err}");
    assert_eq!(st["phase"], "failed", "{st}");
    assert!(
        err.contains("retirement record cannot be read") && !err.contains(&u64::MAX.to_string()),
        "{err}"
    );
    assert_eq!(
        src.json(&["bitmap", "show", "--disk", disk])["epoch"],
        1,
        "the source keeps the disk"
    );
}
