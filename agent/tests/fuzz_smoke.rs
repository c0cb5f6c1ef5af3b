//! CI smoke of every fuzz target (docs/fuzzing.md): the bodies in `fuzz/src/targets/` run here
//! without instrumentation over their committed corpus plus seeded mutations, under the same
//! allocation guard as the fuzz binaries. One test per target,
//! `targets::fuzz_smoke::<name>`; `BITFERRY_TEST_SEED=N` replays a run.

#[path = "../../fuzz/src/guard.rs"]
mod guard;
#[path = "../../fuzz/src/smoke.rs"]
mod smoke;
#[path = "../../fuzz/src/targets/mod.rs"]
mod targets;

#[global_allocator]
static ALLOC: guard::Guard = guard::Guard;

/// Every target has a cargo-fuzz binary, a `[[bin]]` entry and a non-empty corpus.
#[test]
fn every_target_is_wired_up() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let mut names: Vec<&str> = targets::ALL.iter().map(|t| t.name).collect();
    for t in targets::ALL {
        assert!(
            root.join(format!("fuzz_targets/{}.rs", t.name)).is_file(),
            "fuzz/fuzz_targets/{}.rs is missing",
            t.name
        );
        assert!(
            manifest.contains(&format!("name = \"{}\"", t.name)),
            "fuzz/Cargo.toml has no [[bin]] {}",
            t.name
        );
        assert!(
            !smoke::corpus(t.name).is_empty(),
            "fuzz/corpus/{} is empty",
            t.name
        );
        assert!(targets::by_name(t.name).is_some());
    }
    names.sort_unstable();
    names.dedup();
    assert_eq!(names.len(), targets::ALL.len(), "two targets share a name");
}

/// Every target's current seeds are in its committed corpus, so the smoke and every campaign
/// start from inputs that reach today's code (a seed that changed with its format and was not
/// committed fails here). `BITFERRY_WRITE_SEEDS=1` writes the missing ones first:
/// `BITFERRY_WRITE_SEEDS=1 cargo nextest run -p agent --test fuzz_smoke seeds_are_committed`.
#[test]
fn seeds_are_committed() {
    let write = std::env::var_os("BITFERRY_WRITE_SEEDS").is_some_and(|v| v == "1");
    let mut missing = Vec::new();
    for t in targets::ALL {
        let dir = smoke::corpus_dir(t.name);
        for s in (t.seeds)() {
            let path = dir.join(format!("seed-{}", &blake3::hash(&s).to_hex()[..16]));
            if path.is_file() {
                continue;
            }
            if write {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, &s).unwrap();
            } else {
                missing.push(path.display().to_string());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "seeds not in the committed corpus (rerun with BITFERRY_WRITE_SEEDS=1 and commit them, \
         removing seeds that no longer exist): {missing:?}"
    );
}

/// The smoke fails on a body that panics and on one that allocates over its target's limit.
#[test]
fn the_smoke_can_fail() {
    fn panics(_: &[u8]) {
        panic!("a decoder bug");
    }
    fn hungry(d: &[u8]) {
        let v: Vec<u8> = Vec::with_capacity(targets::MIB64 + d.len() + 1);
        drop(std::hint::black_box(v));
    }
    for run in [panics as fn(&[u8]), hungry] {
        let t = targets::Target {
            name: "frame",
            decoder: "a deliberately bad body",
            run,
            max_alloc: targets::MIB64,
            max_len: 16,
            smoke_runs: 1,
            seeds: Vec::new,
        };
        assert!(std::panic::catch_unwind(|| smoke::run(&t)).is_err());
    }
}
