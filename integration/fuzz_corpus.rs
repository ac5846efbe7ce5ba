//! The fuzz corpus on the stable toolchain: every input checked in under
//! `fuzz/corpus/<target>/` (seeds and what long runs kept) and
//! `fuzz/regressions/<target>/` (minimised inputs of findings, once fixed)
//! goes through the same target bodies as `cargo +nightly fuzz run`
//! (`fuzz/src/targets.rs`, compiled in here), so that `scripts/test.sh`
//! proves them on a machine with only stable Rust.

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};

#[path = "../fuzz/src/targets.rs"]
#[allow(dead_code)]
mod targets;

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz")
}

/// Inputs in `dir` (none if it does not exist), sorted.
fn inputs(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut files: Vec<PathBuf> =
        entries.map(|e| e.unwrap().path()).filter(|p| p.is_file() && !p.ends_with("README.md")).collect();
    files.sort();
    files
}

/// Run every input under `sub/<target>/` through its target: (inputs run, failures).
fn replay(sub: &str) -> (usize, Vec<String>) {
    let (mut run, mut failures) = (0, Vec::new());
    for (name, body) in targets::TARGETS {
        for file in inputs(&fuzz_dir().join(sub).join(name)) {
            let data = std::fs::read(&file).unwrap();
            run += 1;
            if let Err(panic) = catch_unwind(AssertUnwindSafe(|| body(&data))) {
                let why = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                failures.push(format!("{name}: {}: {why}", file.display()));
            }
        }
    }
    (run, failures)
}

#[test]
fn every_checked_in_fuzz_input_passes_its_target() {
    for (name, _) in targets::TARGETS {
        let seeds = inputs(&fuzz_dir().join("corpus").join(name));
        assert!(seeds.len() >= 3, "fuzz/corpus/{name} has {} inputs; every target needs a seed corpus", seeds.len());
    }
    let (corpus, mut failures) = replay("corpus");
    let (regressions, more) = replay("regressions");
    failures.extend(more);
    eprintln!(
        "replayed {corpus} corpus and {regressions} regression inputs through {} targets",
        targets::TARGETS.len()
    );
    assert!(failures.is_empty(), "{} inputs fail:\n{}", failures.len(), failures.join("\n"));
}
