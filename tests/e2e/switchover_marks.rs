//! Finding F1 of the hardening issue: marks that the destination acknowledges around the
//! switchover must all be in the bitmap it ends up owning.
//!
//! Two real agents pass one disk back and forth, alternating pre-copy and post-copy. While each
//! switchover happens, several threads mark the destination through its control socket (the way
//! a tracker reports writes: one persistent connection each, one request per write). Every mark
//! the destination answered `ok` is acknowledged; after each migration the new owner's bitmap
//! must contain every acknowledged mark so far (the checkpoint never changes, so the ground truth
//! only grows). `BITFERRY_SWITCHOVERS` sets the number of migrations (default 200: 100 of each
//! kind); the seed is printed and `BITFERRY_TEST_SEED` replays the marks' ranges.

use crate::common::{AgentProc, Limits, agent_toml, blocks_missing, cluster_ca, seed};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wire::{Bitmap, Geometry};

const DISK: &str = "vm/d";
const SIZE: u64 = 64 << 30;
const GRAN: u64 = 4096;
const MARKERS: usize = 4;

/// One control-socket connection, kept open like a tracker's.
struct Control {
    r: BufReader<UnixStream>,
    w: UnixStream,
}

impl Control {
    fn connect(path: &Path) -> Control {
        let s = UnixStream::connect(path).expect("connect to the control socket");
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        Control {
            r: BufReader::new(s.try_clone().unwrap()),
            w: s,
        }
    }

    /// Send one request and return the response line as JSON.
    fn call(&mut self, req: &Value) -> Value {
        let mut line = serde_json::to_vec(req).unwrap();
        line.push(b'\n');
        self.w.write_all(&line).expect("send request");
        let mut resp = String::new();
        self.r.read_line(&mut resp).expect("read response");
        serde_json::from_str(&resp).unwrap_or_else(|e| panic!("bad response {resp:?}: {e}"))
    }

    /// `show` of `disk` in pages, as `bitferry bitmap show` asks: the first page's result
    /// without its extents, and every extent of every page. The marks of a long run outgrow one
    /// reply (`SHOW_PAGE_MAX` extents), and an unpaged request is refused.
    fn show_all(&mut self, disk: &str) -> (Value, Vec<Value>) {
        let mut head = None;
        let mut extents = Vec::new();
        let mut offset = 0u64;
        loop {
            let mut page = self.ok(&json!({
                "cmd": "show", "disk": disk, "limit": 100_000, "offset": offset
            }));
            extents.extend(page["extents"].as_array().expect("extents").iter().cloned());
            let next = page.get("next_offset").and_then(Value::as_u64);
            page.as_object_mut().unwrap().remove("extents");
            head.get_or_insert(page);
            match next {
                Some(n) => offset = n,
                None => return (head.unwrap(), extents),
            }
        }
    }

    /// A request that must succeed; its `result`.
    fn ok(&mut self, req: &Value) -> Value {
        let r = self.call(req);
        assert_eq!(r["ok"], true, "{req} failed: {r}");
        r["result"].clone()
    }
}

/// Mark random ranges on `sock` until `stop`; returns the ranges the agent acknowledged.
fn marker(
    sock: PathBuf,
    seed: u64,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<(u64, u64)>> {
    std::thread::spawn(move || {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut c = Control::connect(&sock);
        let mut acked = Vec::new();
        while !stop.load(Ordering::SeqCst) {
            let off = rng.random_range(0..SIZE - (1 << 20)) & !(GRAN - 1);
            let len = rng.random_range(1..=4 * GRAN);
            let r = c.call(&json!({"cmd": "mark", "disk": DISK, "ranges": [[off, len]]}));
            if r["ok"] == true {
                acked.push((off, len));
            } else {
                // Before the destination accepted the disk there is nowhere to record a mark,
                // and the agent says so: not acknowledged, so not owed.
                std::thread::sleep(Duration::from_micros(200));
            }
        }
        acked
    })
}

fn status(c: &mut Control) -> Value {
    c.ok(&json!({"cmd": "migrate_status", "disk": DISK}))
}

fn wait_until(
    c: &mut Control,
    what: &str,
    logs: &dyn Fn() -> String,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let t = Instant::now();
    loop {
        let st = status(c);
        if done(&st) {
            return st;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "timed out waiting for {what}: {st}\n{}",
            logs()
        );
        std::thread::sleep(Duration::from_millis(2));
    }
}

#[test]
fn every_mark_the_destination_acknowledges_around_a_switchover_is_kept() {
    let switchovers: usize = std::env::var("BITFERRY_SWITCHOVERS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let seed = seed("every_mark_the_destination_acknowledges_around_a_switchover_is_kept");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let names = ["host-a", "host-b"];
    // Transport limits looser than the other e2e tests': this test is about marks, not dead
    // peers, and four markers on two cores can starve a 3 s idle timeout on a loaded machine.
    let limits = Limits {
        idle_ms: 15_000,
        keep_alive_ms: 1000,
        frame_stall_ms: 10_000,
        silence_ms: 20_000,
        flush_ms: 100,
    };
    let agents = names.map(|n| {
        let d = dir.path().join(&n[5..]);
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("agent.toml"), agent_toml(n, &ca, Some(limits), "")).unwrap();
        AgentProc::start(&d, n, &ca, "")
    });
    let addrs = [agents[0].listen_addr(), agents[1].listen_addr()];
    let logs = || {
        format!(
            "host-a log:\n{}\nhost-b log:\n{}",
            agents[0].log(),
            agents[1].log()
        )
    };
    let mut ctl = [
        Control::connect(&agents[0].control),
        Control::connect(&agents[1].control),
    ];
    ctl[0].ok(&json!({"cmd": "create", "disk": DISK, "size": SIZE, "granularity": GRAN, "checkpoint": "b1"}));
    let mut truth = Bitmap::new(Geometry::new(SIZE, GRAN).unwrap());
    let mut lost_runs = Vec::new();
    let mut acked_total = 0usize;
    for i in 0..switchovers {
        let (src, dst) = (i % 2, 1 - i % 2);
        // Both directions see both kinds: pre, pre, post, post, pre, …
        let postcopy = (i / 2) % 2 == 1;
        // Some writes on the owner before the migration, so bulk has something to carry.
        let mut before = Vec::new();
        for _ in 0..rng.random_range(1..20) {
            let off = rng.random_range(0..SIZE - (1 << 20));
            let len = rng.random_range(1..(64 << 10));
            before.push(json!([off, len]));
            truth.mark(off, len).unwrap();
        }
        ctl[src].ok(&json!({"cmd": "mark", "disk": DISK, "ranges": before}));
        ctl[dst].ok(&json!({"cmd": "expect", "disk": DISK, "from": names[src]}));
        ctl[src].ok(&json!({"cmd": "migrate_start", "disk": DISK, "to": addrs[dst]}));
        let stop = Arc::new(AtomicBool::new(false));
        let markers: Vec<_> = (0..MARKERS)
            .map(|_| marker(agents[dst].control.clone(), rng.random(), stop.clone()))
            .collect();
        wait_until(&mut ctl[src], "the first pre-copy round", &logs, |s| {
            s["converged"] == true || s["finished"] == true
        });
        // Let the destination's markers get going on an accepted disk, then pause the VM.
        std::thread::sleep(Duration::from_millis(rng.random_range(0..15)));
        ctl[src].ok(&json!({"cmd": "migrate_switchover", "disk": DISK, "postcopy": postcopy}));
        let end = wait_until(&mut ctl[src], "the source to finish", &logs, |s| {
            s["finished"] == true
        });
        assert_eq!(
            end["phase"],
            "completed",
            "migration {i} (postcopy={postcopy}): {end}\n{}",
            logs()
        );
        wait_until(&mut ctl[dst], "the destination to finish", &logs, |s| {
            s["finished"] == true
        });
        // A few more marks on the new owner after it finished.
        std::thread::sleep(Duration::from_millis(rng.random_range(0..5)));
        stop.store(true, Ordering::SeqCst);
        for m in markers {
            for (o, l) in m.join().expect("marker thread") {
                truth.mark(o, l).unwrap();
                acked_total += 1;
            }
        }
        let (show, extents) = ctl[dst].show_all(DISK);
        assert_eq!(show["state"], "recording", "migration {i}: {show}");
        assert_eq!(show["epoch"], (i + 2) as u64, "migration {i}: {show}");
        let lost = blocks_missing(&extents, &truth);
        if lost > 0 {
            lost_runs.push(format!(
                "migration {i} (postcopy={postcopy}): {lost} acknowledged blocks missing"
            ));
            // Carry on from the owner's bitmap as it is, so later migrations are judged alone.
            truth = Bitmap::new(truth.geometry());
            for e in &extents {
                truth
                    .mark(e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap())
                    .unwrap();
            }
        }
    }
    eprintln!(
        "{switchovers} switchovers, {acked_total} marks acknowledged by destinations, {} migrations lost marks",
        lost_runs.len()
    );
    assert!(
        lost_runs.is_empty(),
        "acknowledged marks lost (seed {seed}):\n{}",
        lost_runs.join("\n")
    );
    assert!(
        acked_total > switchovers,
        "the markers hardly marked anything: {acked_total}"
    );
}
