//! The Prometheus endpoint cannot take the agent's descriptors: a flood of silent scrape
//! connections is capped and timed out, the store keeps committing and the control socket keeps
//! answering. Before, the exporter's listener accepted every connection and kept it open.

use crate::common::{AgentProc, cluster_ca, open_fds};
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// One HTTP/1.1 request; the whole response as text, or `None` if the agent closed the
/// connection without answering.
fn http(port: u16, method: &str, path: &str) -> Option<String> {
    let mut s = TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(
        format!("{method} {path} HTTP/1.1\r\nHost: agent\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    (!out.is_empty()).then_some(out)
}

#[test]
fn silent_scrape_connections_cannot_take_the_agents_descriptors() {
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let port = free_port();
    let a = AgentProc::start_wrapped(
        &dir.path().join("a"),
        "host-a",
        &ca,
        &format!("metrics = \"127.0.0.1:{port}\"\n"),
        &["prlimit", "--nofile=128:128", "--"],
    );
    a.json(&[
        "bitmap",
        "create",
        "--disk",
        "vm/d",
        "--size",
        "1G",
        "--granularity",
        "64K",
    ]);

    // Only GET/HEAD /metrics is the endpoint.
    let ok = http(port, "GET", "/metrics").expect("a scrape is answered");
    assert!(ok.starts_with("HTTP/1.1 200"), "{ok}");
    assert!(ok.contains("text/plain; version=0.0.4"), "{ok}");
    let other = http(port, "GET", "/").expect("answered");
    assert!(other.starts_with("HTTP/1.1 404"), "{other}");
    let post = http(port, "POST", "/metrics").expect("answered");
    assert!(post.starts_with("HTTP/1.1 405"), "{post}");

    // 200 clients connect and say nothing: more than the agent has descriptors.
    let idle: Vec<TcpStream> = (0..200)
        .filter_map(|_| TcpStream::connect(("127.0.0.1", port)).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(500));
    let fds = open_fds(a.child.id());
    eprintln!(
        "{} silent metrics connections: the agent holds {fds} descriptors of 128",
        idle.len()
    );
    assert!(
        fds < 100,
        "the metrics endpoint took the agent's descriptors: {fds} open of 128"
    );
    // The control socket answers and marks still reach the store.
    a.json(&["bitmap", "mark", "--disk", "vm/d", "--range", "0:4096"]);
    let status = a.cli(&["status"]);
    assert!(
        status.status.success(),
        "{}",
        String::from_utf8_lossy(&status.stderr)
    );
    // The silent ones are closed after the header timeout, and scrapes are answered again.
    let t = Instant::now();
    let again = loop {
        match http(port, "GET", "/metrics") {
            Some(r) => break r,
            None if t.elapsed() < Duration::from_secs(15) => {
                std::thread::sleep(Duration::from_millis(250))
            }
            None => panic!("no scrape answered for 15 s after the flood"),
        }
    };
    assert!(again.starts_with("HTTP/1.1 200"), "{again}");
    assert!(
        again.contains("bitferry_"),
        "a flush has happened, so bitferry's series are there: {again}"
    );
    eprintln!("scrapes answered again after {:?}", t.elapsed());
    let show = a.json(&["bitmap", "show", "--disk", "vm/d"]);
    assert_eq!(show["dirty_blocks"], 1, "{show}");
    drop(idle);
}
