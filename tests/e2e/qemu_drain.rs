//! The drain (`agent::qemu::drain`) against real `qemu-system-x86_64 -M none`: random writes
//! through HMP `qemu-io` on a second monitor while the tracker drains every ~50 ms, over both
//! read routes; the union of the drains must equal, bit for bit, a reference bitmap the test
//! added to QEMU itself before the first write (QEMU's SHA-256 and the extents), and cover
//! every completed write. Also: a failing sink (bits merged back), names that never collide,
//! and QEMU killed mid-drain (typed errors, no panic).
//!
//! Seeds are printed; replay with `BITFERRY_TEST_SEED=N`. `BITFERRY_DRAIN_WRITES` sets the
//! number of random writes (default 300).

use agent::qemu::drain::{
    self, BitsFate, DEFAULT_PREFIX, DrainError, Drained, Route, SinkError, Tracker, sha,
};
use agent::qemu::qmp::Qmp;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use wire::{Bitmap, Geometry};

use crate::common::seed;
use crate::qemu_clients::{Proc, qemu_img, qmp, system_emulator, tmp};

const KIB: u64 = 1024;
const MIB: u64 = 1024 * KIB;
/// 96 MiB and three sectors: at 64 KiB the last of 1537 blocks is partial, and QEMU's hashed
/// words (25) are longer than the raw bytes (193).
const SIZE: u64 = 96 * MIB + 1536;
const G: u64 = 64 * KIB;

/// One QEMU with `fmt0` over a fresh qcow2 of [`SIZE`], the tracker's monitor and the
/// test's own (writes, reference bitmap, inspection).
struct Vm {
    proc: Proc,
    agent: Qmp,
    test: Qmp,
    dir: tempfile::TempDir,
}

async fn vm() -> Vm {
    let dir = tmp();
    let img = dir.path().join("disk.qcow2");
    qemu_img(&[
        "create",
        "-q",
        "-f",
        "qcow2",
        img.to_str().unwrap(),
        &SIZE.to_string(),
    ]);
    let (a, t) = (dir.path().join("agent.sock"), dir.path().join("test.sock"));
    let proc = system_emulator(&img, &[&a, &t]);
    let agent = qmp(&a).await;
    let test = qmp(&t).await;
    std::fs::create_dir(dir.path().join("carriers")).unwrap();
    Vm {
        proc,
        agent,
        test,
        dir,
    }
}

impl Vm {
    fn routes(&self) -> [Route; 2] {
        [self.carrier(), self.nbd()]
    }
    fn carrier(&self) -> Route {
        Route::Carrier {
            dir: self.dir.path().join("carriers"),
        }
    }
    fn nbd(&self) -> Route {
        Route::Nbd {
            socket: self.dir.path().join("nbd.sock"),
        }
    }
    fn carrier_dir(&self) -> PathBuf {
        self.dir.path().join("carriers")
    }
}

/// A write as the test records it once QEMU has completed it.
#[derive(Debug, Clone, Copy)]
struct Write {
    off: u64,
    len: u64,
    zero: bool,
}

async fn hmp_write(q: &Qmp, w: Write) {
    let io = if w.zero {
        format!("write -z {} {}", w.off, w.len)
    } else {
        format!("write -P 0x22 {} {}", w.off, w.len)
    };
    let out = q
        .execute(
            "human-monitor-command",
            json!({"command-line": format!("qemu-io fmt0 \"{io}\"")}),
        )
        .await
        .unwrap_or_else(|e| panic!("{io}: {e}"));
    let text = out.as_str().unwrap_or_default();
    assert!(
        !text.contains("failed") && !text.contains("rror"),
        "{io}: {text}"
    );
}

fn random_write(rng: &mut StdRng) -> Write {
    let len = match rng.random_range(0..10) {
        0..=5 => rng.random_range(1..=64 * KIB),
        6..=8 => rng.random_range(1..=512 * KIB),
        _ => rng.random_range(1..=3 * MIB),
    };
    let off = if rng.random_ratio(1, 20) {
        SIZE - len // the partial last block
    } else {
        rng.random_range(0..=SIZE - len)
    };
    Write {
        off,
        len,
        zero: rng.random_ratio(1, 3),
    }
}

/// A pause of 0–19 ms after a write, derived from it (so the seed fixes it too).
fn rng_pause(w: &Write) -> u64 {
    (w.off / 512 + w.len) % 20
}

fn geom() -> Geometry {
    Geometry::new(SIZE, G).unwrap()
}

fn bitmap_of(writes: &[Write]) -> Bitmap {
    let mut b = Bitmap::new(geom());
    for w in writes {
        b.mark(w.off, w.len).unwrap();
    }
    b
}

async fn add_bitmap(q: &Qmp, name: &str, persistent: bool) {
    q.execute(
        "block-dirty-bitmap-add",
        json!({"node": "fmt0", "name": name, "granularity": G, "persistent": persistent}),
    )
    .await
    .unwrap();
}

async fn node_bitmaps(q: &Qmp) -> Vec<Value> {
    let nodes = q
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    nodes
        .as_array()
        .unwrap()
        .iter()
        .find(|n| n["node-name"] == "fmt0")
        .and_then(|n| n["dirty-bitmaps"].as_array().cloned())
        .unwrap_or_default()
}

async fn bitmap_names(q: &Qmp) -> Vec<String> {
    let mut v: Vec<String> = node_bitmaps(q)
        .await
        .iter()
        .map(|b| b["name"].as_str().unwrap().to_string())
        .collect();
    v.sort();
    v
}

/// No carrier node, no export, no carrier file left behind.
async fn nothing_left(vm: &Vm) {
    let nodes = vm
        .test
        .execute("query-named-block-nodes", json!({"flat": true}))
        .await
        .unwrap();
    let names: Vec<&str> = nodes
        .as_array()
        .unwrap()
        .iter()
        .map(|n| n["node-name"].as_str().unwrap())
        .collect();
    assert!(
        names.iter().all(|n| !n.starts_with(DEFAULT_PREFIX)),
        "{names:?}"
    );
    let exports = vm
        .test
        .execute("query-block-exports", json!({}))
        .await
        .unwrap();
    assert_eq!(exports, json!([]));
    let files: Vec<_> = std::fs::read_dir(vm.carrier_dir()).unwrap().collect();
    assert!(files.is_empty(), "{files:?}");
}

fn merge_sink(union: &mut Bitmap) -> impl FnMut(&Drained) -> Result<(), SinkError> + Send + '_ {
    move |d: &Drained| {
        // Rebuild from the extents, as a store fed extents would.
        let mut b = Bitmap::new(d.bitmap.geometry());
        for e in d.extents() {
            b.mark(e.offset, e.length)?;
        }
        assert_eq!(b, d.bitmap);
        union.merge(&b)?;
        Ok(())
    }
}

async fn drained_equals_reference(route_kind: &str) {
    let s = seed(&format!("drain_{route_kind}"));
    let mut rng = StdRng::seed_from_u64(s);
    let n: usize = std::env::var("BITFERRY_DRAIN_WRITES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(300);
    let vm = vm().await;
    let route = match route_kind {
        "carrier" => vm.carrier(),
        _ => vm.nbd(),
    };
    let mut t = Tracker::attach(vm.agent.clone(), "fmt0", Some(G), DEFAULT_PREFIX)
        .await
        .unwrap();
    assert_eq!(t.geometry(), geom());
    assert!(t.checks_sha256());
    add_bitmap(&vm.test, "ref", false).await;

    let writes: Vec<Write> = (0..n).map(|_| random_write(&mut rng)).collect();
    let done = AtomicBool::new(false);
    let mut union = Bitmap::new(geom());
    let started = Instant::now();
    let writer = async {
        // Paced (~10 ms apart) so the writes span dozens of drains.
        for w in &writes {
            hmp_write(&vm.test, *w).await;
            tokio::time::sleep(Duration::from_millis(rng_pause(w))).await;
        }
        done.store(true, Ordering::SeqCst);
    };
    let mut reports = Vec::new();
    let drainer = async {
        let mut sink = merge_sink(&mut union);
        loop {
            let last = done.load(Ordering::SeqCst);
            let r = t.drain(&route, &mut sink).await.expect("drain");
            assert!(r.sha256_checked && r.remove_error.is_none(), "{r:?}");
            reports.push(r);
            if last {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::join!(writer, drainer);
    let elapsed = started.elapsed();

    // Every completed write is covered, and nothing else is set.
    let want = bitmap_of(&writes);
    let mut missing = want.clone();
    missing.subtract(&union).unwrap();
    assert!(missing.is_clean(), "seed {s}: missing blocks");
    assert_eq!(
        union.extents().collect::<Vec<_>>(),
        want.extents().collect::<Vec<_>>()
    );
    // Bit for bit QEMU's own reference bitmap: its SHA-256 and its count.
    let qemu_ref = drain::bitmap_sha256(&vm.test, "fmt0", "ref").await.unwrap();
    assert_eq!(qemu_ref, sha::qemu_sha256(&union), "seed {s}");
    let refinfo = node_bitmaps(&vm.test)
        .await
        .into_iter()
        .find(|b| b["name"] == "ref")
        .unwrap();
    assert_eq!(refinfo["count"], json!(union.count() * G));
    // Only the live tracking bitmap and the reference remain; no carrier, export or file.
    assert_eq!(
        bitmap_names(&vm.test).await,
        vec![t.current().to_string(), "ref".to_string()]
    );
    nothing_left(&vm).await;
    let st = t.stats();
    assert_eq!(st.drains as usize, reports.len());
    assert_eq!((st.failed, st.sha256_mismatches), (0, 0));
    let mut totals: Vec<Duration> = reports.iter().map(|r| r.total).collect();
    totals.sort();
    eprintln!(
        "drain over {route_kind}: seed {s}, {n} writes, {} drains ({} with bits), {} dirty \
         blocks, {elapsed:?}; drain median {:?}, max {:?}; swap median {:?}",
        reports.len(),
        reports.iter().filter(|r| r.blocks > 0).count(),
        union.count(),
        totals[totals.len() / 2],
        totals[totals.len() - 1],
        {
            let mut s: Vec<Duration> = reports.iter().map(|r| r.swap).collect();
            s.sort();
            s[s.len() / 2]
        }
    );
    assert!(
        reports.iter().filter(|r| r.blocks > 0).count() >= 10,
        "writes and drains did not interleave"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_over_carrier_equals_qemu_reference() {
    drained_equals_reference("carrier").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_over_nbd_equals_qemu_reference() {
    drained_equals_reference("nbd").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_sink_merges_back_into_the_next_drain() {
    let vm = vm().await;
    for route in vm.routes() {
        let mut t = Tracker::attach(vm.agent.clone(), "fmt0", Some(G), DEFAULT_PREFIX)
            .await
            .unwrap();
        let a = [
            Write {
                off: 0,
                len: 1,
                zero: false,
            },
            Write {
                off: 5 * MIB,
                len: 300 * KIB,
                zero: true,
            },
        ];
        let b = [Write {
            off: SIZE - 10,
            len: 10,
            zero: false,
        }];
        for w in a {
            hmp_write(&vm.test, w).await;
        }
        let mut fail = |_: &Drained| -> Result<(), SinkError> { Err("disk full".into()) };
        let f = t.drain(&route, &mut fail).await.unwrap_err();
        assert!(matches!(f.error, DrainError::Sink(_)), "{f}");
        assert_eq!(f.bits, BitsFate::MergedBack, "{f}");
        assert_eq!(bitmap_names(&vm.test).await, vec![t.current().to_string()]);
        for w in b {
            hmp_write(&vm.test, w).await;
        }
        let mut got = Bitmap::new(geom());
        let r = t.drain(&route, &mut merge_sink(&mut got)).await.unwrap();
        let mut want = bitmap_of(&a);
        want.merge(&bitmap_of(&b)).unwrap();
        assert_eq!(got, want, "{}", route.name());
        assert_eq!(r.blocks, want.count());
        let st = t.stats();
        assert_eq!((st.drains, st.failed, st.merged_back), (1, 1, 1));
        // Nothing new: an empty drain.
        let r = t.drain(&route, &mut merge_sink(&mut got)).await.unwrap();
        assert_eq!(r.blocks, 0);
        nothing_left(&vm).await;
        t.detach().await.unwrap();
        assert!(bitmap_names(&vm.test).await.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_never_collide() {
    let vm = vm().await;
    // Misuse is refused before anything reaches QEMU.
    for (node, prefix) in [
        ("fmt0", "9bad"),
        ("fmt0", "a/b"),
        ("nosuch", DEFAULT_PREFIX),
    ] {
        let e = Tracker::attach(vm.agent.clone(), node, Some(G), prefix)
            .await
            .unwrap_err();
        assert!(matches!(e, DrainError::Misuse(_)), "{e}");
    }
    let e = Tracker::attach(vm.agent.clone(), "fmt0", Some(1000), DEFAULT_PREFIX)
        .await
        .unwrap_err();
    assert!(matches!(e, DrainError::Misuse(_)), "{e}");
    // Names of others: a libvirt-like checkpoint, a persistent one under our prefix, an odd one.
    add_bitmap(&vm.test, "bitferry-1", false).await;
    add_bitmap(&vm.test, "bitferry-5", true).await;
    add_bitmap(&vm.test, "bitferry-x", false).await;
    add_bitmap(&vm.test, "c1", true).await;
    let mut t = Tracker::attach(vm.agent.clone(), "fmt0", None, DEFAULT_PREFIX)
        .await
        .unwrap();
    assert_eq!(t.current(), "bitferry-6");
    assert_eq!(t.found(), ["bitferry-1", "bitferry-5"]);
    assert_eq!(
        t.geometry().granularity(),
        G,
        "QEMU's default for a 64 KiB-cluster qcow2"
    );
    // Another client takes the name the next swap would pick.
    add_bitmap(&vm.test, "bitferry-7", false).await;
    let w = Write {
        off: 3 * MIB,
        len: 70 * KIB,
        zero: false,
    };
    hmp_write(&vm.test, w).await;
    let mut got = Bitmap::new(geom());
    let r = t
        .drain(&vm.carrier(), &mut merge_sink(&mut got))
        .await
        .unwrap();
    assert_eq!(
        (r.name.as_str(), r.next.as_str()),
        ("bitferry-6", "bitferry-8")
    );
    assert_eq!(got, bitmap_of(&[w]));
    // Every foreign bitmap is still there, untouched and recording that write.
    let all = node_bitmaps(&vm.test).await;
    for name in ["bitferry-1", "bitferry-5", "bitferry-7", "bitferry-x", "c1"] {
        let b = all
            .iter()
            .find(|b| b["name"] == name)
            .unwrap_or_else(|| panic!("{name} gone"));
        assert_eq!(b["recording"], json!(true), "{name}");
        assert_eq!(b["count"], json!(2 * G), "{name}");
    }
    assert!(all.iter().all(|b| b["name"] != "bitferry-6"));
    // A second tracker on the same node picks a name above every one of them.
    let t2 = Tracker::attach(vm.agent.clone(), "fmt0", Some(G), DEFAULT_PREFIX)
        .await
        .unwrap();
    assert_eq!(t2.current(), "bitferry-9");
    assert_eq!(
        t2.found(),
        ["bitferry-1", "bitferry-5", "bitferry-7", "bitferry-8"]
    );
}

fn sigkill(pid: u32) {
    let st = std::process::Command::new("kill")
        .args(["-9", &pid.to_string()])
        .status()
        .unwrap();
    assert!(st.success());
}

/// QEMU SIGKILLed inside the sink (bits neither durable nor in QEMU: `Lost`), after the sink
/// made them durable (`Committed`), and at random moments of a drain loop: always a typed
/// error, never a panic, and every later drain says QEMU is gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn qemu_killed_mid_drain_is_a_typed_error() {
    for (i, route_kind) in ["carrier", "nbd"].into_iter().enumerate() {
        // In the sink, failing: the bits are gone with QEMU.
        for sink_ok in [false, true] {
            let vm = vm().await;
            let route = if i == 0 { vm.carrier() } else { vm.nbd() };
            let mut t = Tracker::attach(vm.agent.clone(), "fmt0", Some(G), DEFAULT_PREFIX)
                .await
                .unwrap();
            hmp_write(
                &vm.test,
                Write {
                    off: MIB,
                    len: 1,
                    zero: false,
                },
            )
            .await;
            let pid = vm.proc.child.id();
            let mut sink = move |_: &Drained| -> Result<(), SinkError> {
                sigkill(pid);
                if sink_ok {
                    Ok(())
                } else {
                    Err("agent store crashed too".into())
                }
            };
            let f = t.drain(&route, &mut sink).await.unwrap_err();
            if sink_ok {
                assert!(f.error.is_qemu_gone(), "{route_kind}: {f}");
                assert_eq!(f.bits, BitsFate::Committed, "{f}");
            } else {
                assert!(matches!(f.error, DrainError::Sink(_)), "{f}");
                assert_eq!(f.bits, BitsFate::Lost, "{f}");
            }
            let f = t.drain(&route, &mut sink).await.unwrap_err();
            assert!(f.error.is_qemu_gone(), "{f}");
            assert_eq!(f.bits, BitsFate::Lost);
        }
    }
    // At random moments while draining (and writing).
    let s = seed("drain_kill");
    let mut rng = StdRng::seed_from_u64(s);
    let mut outcomes = std::collections::BTreeMap::<String, u32>::new();
    for round in 0..6 {
        let vm = vm().await;
        let route = if round % 2 == 0 {
            vm.carrier()
        } else {
            vm.nbd()
        };
        let mut t = Tracker::attach(vm.agent.clone(), "fmt0", Some(G), DEFAULT_PREFIX)
            .await
            .unwrap();
        let pid = vm.proc.child.id();
        let after = Duration::from_millis(rng.random_range(20..400));
        let killer = std::thread::spawn(move || {
            std::thread::sleep(after);
            sigkill(pid);
        });
        let writes: Vec<Write> = (0..200).map(|_| random_write(&mut rng)).collect();
        let writer = async {
            for w in &writes {
                let io = format!("qemu-io fmt0 \"write -P 0x33 {} {}\"", w.off, w.len);
                if vm
                    .test
                    .execute("human-monitor-command", json!({ "command-line": io }))
                    .await
                    .is_err()
                {
                    break;
                }
            }
        };
        let drainer = async {
            let mut sink = |_: &Drained| -> Result<(), SinkError> { Ok(()) };
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                assert!(Instant::now() < deadline, "QEMU never seemed gone");
                match t.drain(&route, &mut sink).await {
                    Ok(_) => {}
                    Err(f) => {
                        let key = format!("{}: {:?}", f.error.is_qemu_gone(), f.bits);
                        *outcomes.entry(key).or_default() += 1;
                        assert!(f.error.is_qemu_gone(), "round {round}, seed {s}: {f}");
                        // Once gone, always gone.
                        let again = t.drain(&route, &mut sink).await.unwrap_err();
                        assert!(again.error.is_qemu_gone() && again.bits == BitsFate::Lost);
                        break;
                    }
                }
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        };
        tokio::join!(writer, drainer);
        killer.join().unwrap();
        let leftovers: Vec<_> = std::fs::read_dir(vm.carrier_dir()).unwrap().collect();
        assert!(leftovers.is_empty(), "{leftovers:?}");
    }
    eprintln!("drain_kill: seed {s}, outcomes {outcomes:?}");
}
