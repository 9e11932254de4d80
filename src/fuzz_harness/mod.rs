//! The bodies of the fuzz targets: each takes the fuzzer's bytes and drives
//! one parser or state machine that reads peer input. `fuzz/` (cargo-fuzz,
//! coverage-guided) and `tests/fuzz_regressions.rs` (the committed seeds
//! and every crash ever found, replayed on each test run) call the same
//! functions, so a crash found by the fuzzer becomes a regression test by
//! dropping its input into `fuzz/regressions/<target>/`.
//!
//! Only built with the `fuzzing` feature (tests and the fuzz crate turn it
//! on); nothing here ships in a binary.
//!
//! The larger targets have a module each: [`token_body`] (the token
//! endpoint's authentication step) and [`clawkerd_dispatch`] (clawkerd's
//! session dispatcher fed arbitrary `Command` sequences).

pub mod clawkerd_dispatch;
pub mod token_body;

use std::sync::OnceLock;
use std::time::Duration;

use prost::Message;

use crate::docker::DockerError;
use crate::docker::watch::{FeederState, NetworkProbe, parse_event_json};
use crate::proto::{agent::v1 as agent, clawkerd::v1 as clawkerd};
use crate::registry::{Entry, RegistryError};
use crate::session::classify::RegistryLookup;
use crate::session::command::{RunAs, run_to_completion, shell};
use crate::session::mux::SessionMux;
use crate::session::register;

/// One fuzz target's body.
pub type Target = fn(&[u8]);

/// Every target by name (the fuzz crate's binaries and the seed folders).
pub const TARGETS: &[(&str, Target)] = &[
    ("proto_decode", proto_decode),
    ("cp_config_toml", cp_config_toml),
    ("pem_load", pem_load),
    ("peer_leaf", peer_leaf),
    ("jwt_verify", jwt_verify),
    ("docker_event", docker_event),
    ("session_mux", session_mux),
    ("token_body", token_body::token_body),
    ("clawkerd_dispatch", clawkerd_dispatch::clawkerd_dispatch),
];

fn roundtrip<M: Message + Default + PartialEq + std::fmt::Debug>(data: &[u8]) {
    if let Ok(m) = M::decode(data) {
        let bytes = m.encode_to_vec();
        assert_eq!(bytes.len(), m.encoded_len());
        let again = M::decode(bytes.as_slice()).expect("re-decode of our own encoding");
        assert_eq!(m, again);
    }
}

/// Every wire message clawkerd and the CP decode from a peer: arbitrary
/// bytes are a decode error or a message that survives a round trip. The
/// first byte picks the message.
pub fn proto_decode(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    match sel % 3 {
        0 => roundtrip::<clawkerd::Command>(rest),
        1 => roundtrip::<clawkerd::Response>(rest),
        _ => roundtrip::<agent::RegisterRequest>(rest),
    }
}

/// `clawker cp serve --config FILE`: the TOML layer and its resolution.
pub fn cp_config_toml(data: &[u8]) {
    use crate::cp::config::{FileConfig, Overrides, resolve};
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(file) = toml::from_str::<FileConfig>(text) {
        let _ = resolve("/state".into(), file, Overrides::default());
    }
}

/// PEM loading of certificates and keys (state dir, bootstrap bundles).
pub fn pem_load(data: &[u8]) {
    let _ = crate::tls::load_certs("fuzz", data);
    let _ = crate::tls::load_key("fuzz", data);
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = crate::pki::single_pem_block("fuzz", text, "CERTIFICATE");
        let _ = crate::pki::load_p256_key("fuzz", text);
    }
}

/// The DER leaf a TLS peer presents: identity extraction and the pin check.
pub fn peer_leaf(data: &[u8]) {
    let _ = crate::agent_api::peer::PeerLeaf::parse(data);
    let _ = crate::tls::cert_cn(data);
    let _ = crate::tls::check_pinned_leaf(data, crate::defaults::CP_NAME);
}

/// A fixed, valid uncompressed P-256 point (the generator G).
const P256_G: [u8; 65] = [
    0x04, 0x6b, 0x17, 0xd1, 0xf2, 0xe1, 0x2c, 0x42, 0x47, 0xf8, 0xbc, 0xe6, 0xe5, 0x63, 0xa4, 0x40,
    0xf2, 0x77, 0x03, 0x7d, 0x81, 0x2d, 0xeb, 0x33, 0xa0, 0xf4, 0xa1, 0x39, 0x45, 0xd8, 0x98, 0xc2,
    0x96, 0x4f, 0xe3, 0x42, 0xe2, 0xfe, 0x1a, 0x7f, 0x9b, 0x8e, 0xe7, 0xeb, 0x4a, 0x7c, 0x0f, 0x9e,
    0x16, 0x2b, 0xce, 0x33, 0x57, 0x6b, 0x31, 0x5e, 0xce, 0xcb, 0xb6, 0x40, 0x68, 0x37, 0xbf, 0x51,
    0xf5,
];

/// The client assertion (compact JWS) an agent posts to the token endpoint.
pub fn jwt_verify(data: &[u8]) {
    if let Ok(jwt) = std::str::from_utf8(data) {
        let _ = crate::agent_api::assertion::verify_es256(jwt, &P256_G);
    }
}

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

/// Docker events: the engine's JSON → `DockerEvent` → the feeder's filter
/// (a network probe whose answers come from the input too); any event read
/// back from its name and JSON (`events::decode`, the CLI's path). Lines
/// are events in order; a line `NAME JSON` is also decoded as a bus event.
pub fn docker_event(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let mut state = FeederState::default();
    for (i, line) in rest.split(|b| *b == b'\n').enumerate() {
        if let Ok(ev) = parse_event_json(line) {
            let probe = Probe(sel.wrapping_add(i as u8));
            if let Some(out) = futures::executor::block_on(state.dispatch(ev, &probe)) {
                // What the bus would carry must serialise and read back.
                let wrapped = crate::events::DockerEventOccurred::new(out);
                let json = serde_json::to_string(&wrapped).expect("serialise");
                let back = crate::events::decode("docker.event", &json).expect("decode");
                assert!(matches!(
                    back,
                    crate::events::Decoded::DockerEventOccurred(_)
                ));
            }
        }
        if let Ok(text) = std::str::from_utf8(line)
            && let Some((name, json)) = text.split_once(' ')
        {
            let _ = crate::events::decode(name, json);
        }
    }
}

const MUX_IDS: [&str; 4] = ["step", "register-c1", "other", ""];

struct NoRows;

impl RegistryLookup for NoRows {
    fn lookup_by_container_id(&self, _: &str) -> Result<Entry, RegistryError> {
        Err(RegistryError::UnknownAgent)
    }
}

fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_current_thread()
            .enable_time()
            .build()
            .expect("runtime")
    })
}

/// The input as `[selector, len, prost Response bytes…]*`; the selector
/// picks each frame's command id (high bit: keep the decoded one), a frame
/// that does not decode becomes a transport error.
fn mux_frames(mut data: &[u8]) -> Vec<Result<clawkerd::Response, tonic::Status>> {
    let mut out = Vec::new();
    while data.len() >= 2 {
        let (sel, len) = (data[0], data[1] as usize);
        let end = (2 + len).min(data.len());
        let body = &data[2..end];
        data = &data[end..];
        match clawkerd::Response::decode(body) {
            Ok(mut r) => {
                if sel & 0x80 == 0 {
                    r.command_id = MUX_IDS[(sel as usize) % MUX_IDS.len()].to_owned();
                }
                out.push(Ok(r));
            }
            Err(_) => out.push(Err(tonic::Status::unavailable("garbage frame"))),
        }
    }
    out
}

/// The CP's session mux fed an arbitrary Response sequence while an init
/// step and a Register round wait on it: no panic, and every waiter ends
/// once the stream ends.
pub fn session_mux(data: &[u8]) {
    let frames = mux_frames(data);
    runtime().block_on(async move {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Box<clawkerd::Command>>(64);
        let (rtx, rrx) = tokio::sync::mpsc::unbounded_channel();
        let mux = SessionMux::start(
            tx,
            tokio_stream::wrappers::UnboundedReceiverStream::new(rrx),
        );
        let peer = tokio::spawn(async move {
            // Let the waiters register their routes and send first.
            for _ in 0..8 {
                tokio::task::yield_now().await;
            }
            for f in frames {
                let _ = rtx.send(f);
            }
            drop(rtx);
            while rx.recv().await.is_some() {}
        });
        let step = run_to_completion(
            &mux,
            "step",
            shell("true", &RunAs::root(), 1, b""),
            Duration::from_secs(5),
            64,
        );
        let reg = register::drive(&mux, &NoRows, "c1", Duration::from_secs(5));
        let _ = tokio::join!(step, reg);
        let _ = mux.closed().await.reason();
        drop(mux);
        let _ = peer.await;
    });
}
