//! The bodies of sessionlb's fuzz targets (`fuzz_targets/*.rs` are one line
//! each). Kept in `targets.rs` so that the stable-toolchain test
//! `integration/fuzz_corpus.rs` replays the checked-in corpus through the
//! very same functions.

pub mod targets;
