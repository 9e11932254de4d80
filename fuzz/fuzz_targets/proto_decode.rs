//! Every wire message clawkerd and the CP decode from a peer.
//! The body lives in `clawker::fuzz_harness`, shared with
//! `tests/fuzz_regressions.rs`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| clawker::fuzz_harness::proto_decode(data));
