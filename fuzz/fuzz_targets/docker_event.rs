//! Docker events: the engine's JSON → `DockerEvent` → the feeder's filter
//! (with a network probe whose answers come from the input too), and any
//! event read back from its name + JSON (`events::decode`, the CLI's path).
#![no_main]
use clawker::docker::DockerError;
use clawker::docker::watch::{FeederState, NetworkProbe, parse_event_json};
use libfuzzer_sys::fuzz_target;

struct Probe(u8);

impl NetworkProbe for Probe {
    async fn is_managed(&self, _: &str) -> Result<bool, DockerError> {
        match self.0 % 3 {
            0 => Ok(true),
            1 => Ok(false),
            _ => Err(DockerError::NotFound("net".into())),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    // A newline splits the input into events fed to one feeder in order.
    let mut state = FeederState::default();
    for (i, line) in rest.split(|b| *b == b'\n').enumerate() {
        if let Ok(ev) = parse_event_json(line) {
            let probe = Probe(sel.wrapping_add(i as u8));
            if let Some(out) = futures::executor::block_on(state.dispatch(ev, &probe)) {
                // What the bus would carry must serialise and read back.
                let wrapped = clawker::events::DockerEventOccurred::new(out);
                let json = serde_json::to_string(&wrapped).expect("serialise");
                let back = clawker::events::decode("docker.event", &json).expect("decode");
                assert!(matches!(
                    back,
                    clawker::events::Decoded::DockerEventOccurred(_)
                ));
            }
        }
        if let Ok(text) = std::str::from_utf8(line)
            && let Some((name, json)) = text.split_once(' ')
        {
            let _ = clawker::events::decode(name, json);
        }
    }
});
