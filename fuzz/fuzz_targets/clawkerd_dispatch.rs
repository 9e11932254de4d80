//! clawkerd's session dispatcher fed arbitrary `Command` sequences (every
//! program rewritten to a benign allow-list). The body lives in
//! `clawker::fuzz_harness::clawkerd_dispatch`, shared with
//! `tests/fuzz_regressions.rs`.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    clawker::fuzz_harness::clawkerd_dispatch::clawkerd_dispatch(data)
});
