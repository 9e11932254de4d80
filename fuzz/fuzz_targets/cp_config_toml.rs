//! `clawker cp serve --config FILE`: the TOML layer and its resolution.
#![no_main]
use clawker::cp::config::{FileConfig, Overrides, resolve};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = toml::from_str::<FileConfig>(text) {
        let _ = resolve("/state".into(), file, Overrides::default());
    }
});
