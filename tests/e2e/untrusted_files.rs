//! Finding F8 of the hardening issue: a store file the running agent cannot trust is listed
//! `inconsistent` with its reason — never dropped from `list`/`show`/`verify` as if the disk
//! did not exist — and offers for its disk are refused, since its epoch is unknown.

use crate::common::{AgentProc, cluster_ca};
use std::time::{Duration, Instant};

fn rows(a: &AgentProc) -> serde_json::Value {
    a.json(&["bitmap", "list"])
}

fn row<'a>(list: &'a serde_json::Value, disk: &str) -> &'a serde_json::Value {
    list["bitmaps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["disk"] == disk)
        .unwrap_or_else(|| panic!("{disk} missing from the list: {list}"))
}

#[test]
fn damaged_and_deleted_store_files_are_listed_inconsistent_and_refuse_offers() {
    let dir = tempfile::tempdir().unwrap();
    let ca = cluster_ca(&dir.path().join("ca"));
    let adir = dir.path().join("a");
    let mut a = AgentProc::start(&adir, "host-a", &ca, "");
    for d in ["d1", "d2", "d3", "d4"] {
        a.json(&[
            "bitmap",
            "create",
            "--disk",
            d,
            "--size",
            "1G",
            "--granularity",
            "64K",
        ]);
        a.json(&["bitmap", "mark", "--disk", d, "--range", "0:1M"]);
    }
    assert!(a.terminate().success());
    let store = a.store.clone();
    // d1: a header byte flipped; d2: an unknown format version; d3: holds d4's bitmap.
    let mut f = std::fs::read(store.join("d1.bfb")).unwrap();
    f[20] ^= 0x40;
    std::fs::write(store.join("d1.bfb"), f).unwrap();
    let mut f = std::fs::read(store.join("d2.bfb")).unwrap();
    f[8..12].copy_from_slice(&99u32.to_le_bytes());
    std::fs::write(store.join("d2.bfb"), f).unwrap();
    std::fs::copy(store.join("d4.bfb"), store.join("d3.bfb")).unwrap();

    let a = AgentProc::start(&adir, "host-a", &ca, "");
    let list = rows(&a);
    for d in ["d1", "d2", "d3"] {
        let r = row(&list, d);
        assert_eq!(r["state"], "inconsistent", "{d}: {r}");
        assert!(
            r["reason"].as_str().is_some_and(|s| !s.is_empty()),
            "{d} lists no reason: {r}"
        );
        let show = a.json(&["bitmap", "show", "--disk", d]);
        assert_eq!(show["state"], "inconsistent", "{show}");
        assert!(show["reason"].is_string(), "{show}");
        let v = a.cli(&["bitmap", "verify", "--disk", d]);
        assert_eq!(
            v.status.code(),
            Some(3),
            "verify of {d} must fail as untrusted"
        );
        let err = String::from_utf8_lossy(&v.stderr);
        assert!(err.contains("cannot be read"), "{d}: {err}");
        let m = a.cli(&["bitmap", "mark", "--disk", d, "--range", "0:1"]);
        assert_eq!(
            m.status.code(),
            Some(3),
            "a mark on an unreadable {d} must be refused"
        );
    }
    assert!(
        row(&list, "d3")["reason"].as_str().unwrap().contains("d4"),
        "d3's reason names the disk its file holds: {list}"
    );
    assert_eq!(row(&list, "d4")["state"], "recording");

    // An offer for an unreadable disk is refused, with the real cause.
    let b = AgentProc::start(&dir.path().join("b"), "host-b", &ca, "");
    b.json(&[
        "bitmap",
        "create",
        "--disk",
        "d1",
        "--size",
        "1G",
        "--granularity",
        "64K",
    ]);
    a.json(&["expect", "--disk", "d1", "--from", "host-b"]);
    b.json(&["migrate", "start", "--disk", "d1", "--to", &a.listen_addr()]);
    let t = Instant::now();
    let st = loop {
        let st = b.json(&["migrate", "status", "--disk", "d1"]);
        if st["finished"] == true {
            break st;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "{st}");
        std::thread::sleep(Duration::from_millis(20));
    };
    let err = st["error"].as_str().unwrap_or_default();
    assert!(
        err.contains("store file cannot be read"),
        "the refusal names the cause: {st}"
    );
    assert_eq!(
        b.json(&["bitmap", "show", "--disk", "d1"])["state"],
        "recording",
        "the refused source keeps its disk"
    );

    // A file deleted while the agent runs: verify notices, and the disk says inconsistent.
    std::fs::remove_file(store.join("d4.bfb")).unwrap();
    let v = a.cli(&["bitmap", "verify", "--disk", "d4"]);
    assert_eq!(v.status.code(), Some(3));
    assert!(String::from_utf8_lossy(&v.stderr).contains("disappeared"));
    assert_eq!(row(&rows(&a), "d4")["state"], "inconsistent");
}
