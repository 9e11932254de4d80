//! Docker events: engine JSON, the feeder's filter, events read back from JSON.
//! The body lives in `clawker::fuzz_harness`, shared with
//! `tests/fuzz_regressions.rs`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| clawker::fuzz_harness::docker_event(data));
