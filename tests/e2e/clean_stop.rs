//! A clean stop (SIGTERM) must not lose an acknowledged mark: every `bitmap mark` that exited 0
//! before the agent exited is in the bitmap the agent committed `consistent` on its way out.
//!
//! Found by the kill campaign (its "during clean stop" phase): `daemon::serve` commits every
//! bitmap back as `consistent` (`AgentState::close`) while the control server is still serving,
//! so a mark that takes the state lock after `close()` is applied in memory only and answered
//! `ok`; the agent exits, and after the restart its `consistent` file lacks the mark. Fixed by
//! refusing every control request once `close()` has run (`AgentState::is_closed`): a mark
//! then fails, and the marker knows to send it again.

use crate::campaign::checker::{self, Ack, DiskView, Entry};
use crate::common::{AgentProc, bitferry, cluster_ca, seed};
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const SIZE: u64 = 16 << 30;

#[test]
fn clean_stop_keeps_every_acknowledged_mark() {
    let seed = seed("clean_stop_keeps_every_acknowledged_mark");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let adir = dir.path().join("a");
    let mut a = AgentProc::start(&adir, "host-a", &ca, "");
    a.json(&[
        "bitmap",
        "create",
        "--disk",
        "vm/d",
        "--size",
        &SIZE.to_string(),
        "--granularity",
        "4096",
    ]);
    let acks: Arc<Mutex<Vec<Ack>>> = Arc::default();
    for stop in 0..40 {
        let done = Arc::new(AtomicBool::new(false));
        let writers: Vec<_> = (0..3)
            .map(|_| {
                let (done, acks, control) = (done.clone(), acks.clone(), a.control.clone());
                let mut rng = rand::rngs::StdRng::seed_from_u64(rng.random());
                std::thread::spawn(move || {
                    while !done.load(Ordering::SeqCst) {
                        let off = rng.random_range(0..SIZE - 4096);
                        let out = bitferry()
                            .arg("--control")
                            .arg(&control)
                            .args(["bitmap", "mark", "--disk", "vm/d", "--range"])
                            .arg(format!("{off}:4096"))
                            .output()
                            .unwrap();
                        if out.status.success() {
                            acks.lock().unwrap().push(Ack {
                                ranges: vec![(off, 4096)],
                                host: "host-a".into(),
                                at_ms: 0,
                                route: format!("before clean stop {stop}"),
                                forwarded: false,
                            });
                        } else {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                    }
                })
            })
            .collect();
        std::thread::sleep(Duration::from_millis(rng.random_range(100..300)));
        let st = a.terminate();
        assert!(st.success(), "clean stop {stop}: {st}");
        done.store(true, Ordering::SeqCst);
        for w in writers {
            w.join().unwrap();
        }
        drop(a);
        a = AgentProc::start(&adir, "host-a", &ca, "");
        let v = a.json(&["bitmap", "show", "--disk", "vm/d"]);
        let entry = Entry {
            host: "host-a".into(),
            state: v["state"].as_str().unwrap().into(),
            epoch: v["epoch"].as_u64().unwrap(),
            extents: v["extents"].as_array().map(|x| {
                x.iter()
                    .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
                    .collect()
            }),
            reason: None,
        };
        assert_eq!(entry.state, "recording", "after clean stop {stop}: {v}");
        let view = DiskView {
            disk: "vm/d".into(),
            geometry: wire::Geometry::new(SIZE, 4096).unwrap(),
            entries: vec![entry],
            retired: Default::default(),
        };
        let violations = checker::check(&view, &acks.lock().unwrap());
        assert!(
            violations.is_empty(),
            "seed {seed}, clean stop {stop}: {violations:?}"
        );
    }
}
