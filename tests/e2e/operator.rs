//! What an operator relies on (issue 15): files that guard themselves (no silent overwrite, no
//! manifest of the live image itself).

use crate::common::{json_in, run_in};
use serde_json::Value;
use std::path::Path;
use std::process::Output;

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

/// Every JSON document on `stdout`; panics if it is not a sequence of JSON values.
fn documents(stdout: &[u8]) -> Vec<Value> {
    serde_json::Deserializer::from_slice(stdout)
        .into_iter::<Value>()
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}",
                String::from_utf8_lossy(stdout)
            )
        })
}

/// The command failed with exactly one JSON document on stdout, whose `exit_code` is the
/// process's and whose `error` says something. Returns it.
fn one_failure(what: &str, o: &Output) -> Value {
    let docs = documents(&o.stdout);
    assert_eq!(
        docs.len(),
        1,
        "{what}: {} JSON documents on stdout: {}",
        docs.len(),
        String::from_utf8_lossy(&o.stdout)
    );
    let d = docs.into_iter().next().unwrap();
    let code = o.status.code().expect("exited");
    assert_ne!(code, 0, "{what}: succeeded: {d}");
    assert_eq!(d["exit_code"].as_i64(), Some(code.into()), "{what}: {d}");
    assert!(
        d["error"].as_str().is_some_and(|e| !e.is_empty()),
        "{what}: no error text: {d}"
    );
    d
}

/// The block manifest format version 1 (no image identity), written by hand as bitferry
/// before version 2 wrote it.
fn manifest_v1(data: &[u8], g: u64) -> Vec<u8> {
    let blocks = (data.len() as u64).div_ceil(g);
    let entries: Vec<u8> = data
        .chunks(g as usize)
        .flat_map(|b| *blake3::hash(b).as_bytes())
        .collect();
    let mut f = b"BFMANIF\0".to_vec();
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&(data.len() as u64).to_le_bytes());
    f.extend_from_slice(&g.to_le_bytes());
    f.extend_from_slice(&blocks.to_le_bytes());
    f.extend_from_slice(blake3::hash(&entries).as_bytes());
    f.extend_from_slice(&entries);
    f
}

#[test]
fn manifest_and_export_refuse_existing_files_and_rebuild_refuses_a_manifest_of_the_live_image() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let store = d.join("store");
    let g = 4096u64;
    let backup_data: Vec<u8> = (0..(256 * 1024u32)).map(|i| (i % 251) as u8).collect();
    let mut live_data = backup_data.clone();
    for blk in [3usize, 17, 40] {
        live_data[blk * g as usize + 7] ^= 0xff;
    }
    let (backup, live) = (d.join("backup.img"), d.join("live.img"));
    std::fs::write(&backup, &backup_data).unwrap();
    std::fs::write(&live, &live_data).unwrap();
    let man = d.join("backup.manifest");
    let create = |image: &Path, out: &Path, force: bool| {
        let mut args = vec![
            "manifest",
            "create",
            "--image",
            s(image),
            "--granularity",
            "4K",
            "--out",
            s(out),
        ];
        if force {
            args.push("--force");
        }
        run_in(&store, &args)
    };
    assert!(create(&backup, &man, false).status.success());
    let first = std::fs::read(&man).unwrap();

    // An existing --out is refused without --force, and left as it was.
    std::fs::write(&man, b"not a manifest").unwrap();
    let o = create(&backup, &man, false);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(
        stderr(&o).contains("already exists") && stderr(&o).contains("--force"),
        "{}",
        stderr(&o)
    );
    assert_eq!(std::fs::read(&man).unwrap(), b"not a manifest");
    let o = create(&backup, &man, true);
    assert!(o.status.success(), "{}", stderr(&o));
    assert_eq!(std::fs::read(&man).unwrap().len(), first.len());
    // --force never lets the manifest replace the image it is made from.
    let o = create(&backup, &backup, true);
    assert!(!o.status.success() && stderr(&o).contains("is the image itself"));
    assert_eq!(std::fs::read(&backup).unwrap(), backup_data);

    // A bitmap to rebuild, with one mark, so a refused rebuild can be seen to change nothing.
    json_in(
        &store,
        &[
            "bitmap",
            "create",
            "--disk",
            "vm/a",
            "--size",
            "256K",
            "--granularity",
            "4K",
        ],
    );
    json_in(
        &store,
        &["bitmap", "mark", "--disk", "vm/a", "--range", "0:1"],
    );
    let before = json_in(&store, &["bitmap", "show", "--disk", "vm/a"]);
    let rebuild = |manifest: &Path| {
        run_in(
            &store,
            &[
                "--json",
                "rebuild",
                "--image",
                s(&live),
                "--manifest",
                s(manifest),
                "--granularity",
                "4K",
                "--disk",
                "vm/a",
            ],
        )
    };
    // The slip: a manifest made from the live image (also reached through another path).
    let of_live = d.join("live.manifest");
    assert!(create(&live, &of_live, false).status.success());
    std::fs::hard_link(&live, d.join("live-link.img")).unwrap();
    for (what, out) in [
        ("same path", rebuild(&of_live)),
        (
            "hard link",
            run_in(
                &store,
                &[
                    "--json",
                    "rebuild",
                    "--image",
                    s(&d.join("live-link.img")),
                    "--manifest",
                    s(&of_live),
                    "--granularity",
                    "4K",
                    "--disk",
                    "vm/a",
                ],
            ),
        ),
    ] {
        let doc = one_failure(what, &out);
        let e = doc["error"].as_str().unwrap();
        assert!(
            e.contains("was made from") && e.contains("--backup") && e.contains("inode"),
            "{what}: {e}"
        );
        assert_eq!(
            json_in(&store, &["bitmap", "show", "--disk", "vm/a"]),
            before,
            "{what}: a refused rebuild changed the bitmap"
        );
    }
    // The backup's manifest works and finds exactly the changed blocks.
    let out = rebuild(&man);
    assert!(out.status.success(), "{}", stderr(&out));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["dirty_blocks"].as_u64(), Some(3), "{v}");
    // A version 1 manifest (no identity) is still read, with the same result.
    let v1 = d.join("backup.v1.manifest");
    std::fs::write(&v1, manifest_v1(&backup_data, g)).unwrap();
    let out = rebuild(&v1);
    assert!(out.status.success(), "{}", stderr(&out));
    let w: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(w["extents"], v["extents"]);
    assert_eq!(w["dirty_blocks"].as_u64(), Some(3));

    // bitmap export --raw: the same rule.
    let raw = d.join("a.raw");
    json_in(
        &store,
        &["bitmap", "export", "--disk", "vm/a", "--raw", s(&raw)],
    );
    let exported = std::fs::read(&raw).unwrap();
    std::fs::write(&raw, b"keep me").unwrap();
    let o = run_in(
        &store,
        &[
            "--json",
            "bitmap",
            "export",
            "--disk",
            "vm/a",
            "--raw",
            s(&raw),
        ],
    );
    let doc = one_failure("export over a file", &o);
    assert!(doc["error"].as_str().unwrap().contains("--force"), "{doc}");
    assert_eq!(std::fs::read(&raw).unwrap(), b"keep me");
    json_in(
        &store,
        &[
            "bitmap",
            "export",
            "--disk",
            "vm/a",
            "--raw",
            s(&raw),
            "--force",
        ],
    );
    assert_eq!(std::fs::read(&raw).unwrap(), exported);
}
