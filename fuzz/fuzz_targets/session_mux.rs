//! The CP's session mux fed an arbitrary Response sequence while an init
//! step, a Register round and a streaming reader wait on it: no panic, and
//! every waiter ends once the stream ends (an input is a list of
//! length-prefixed prost `Response`s; a selector byte picks each one's id).
#![no_main]
use std::sync::OnceLock;
use std::time::Duration;

use clawker::proto::clawkerd::v1::{Command, Response};
use clawker::registry::{Entry, RegistryError};
use clawker::session::classify::RegistryLookup;
use clawker::session::command::{RunAs, run_to_completion, shell};
use clawker::session::mux::SessionMux;
use clawker::session::register;
use libfuzzer_sys::fuzz_target;
use prost::Message;

const IDS: [&str; 4] = ["step", "register-c1", "other", ""];

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

fn responses(mut data: &[u8]) -> Vec<Result<Response, tonic::Status>> {
    let mut out = Vec::new();
    while data.len() >= 2 {
        let (sel, len) = (data[0], data[1] as usize);
        let body = &data[2..(2 + len).min(data.len())];
        data = &data[(2 + len).min(data.len())..];
        match Response::decode(body) {
            Ok(mut r) => {
                if sel & 0x80 == 0 {
                    r.command_id = IDS[(sel as usize) % IDS.len()].to_owned();
                }
                out.push(Ok(r));
            }
            Err(_) => out.push(Err(tonic::Status::unavailable("garbage frame"))),
        }
    }
    out
}

fuzz_target!(|data: &[u8]| {
    let frames = responses(data);
    runtime().block_on(async move {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Command>(64);
        let (rtx, rrx) = tokio::sync::mpsc::unbounded_channel();
        let mux = SessionMux::start(
            tx,
            tokio_stream::wrappers::UnboundedReceiverStream::new(rrx),
        );
        // The peer: swallow commands; answer with the fuzzed frames once the
        // waiters have sent theirs, then end the stream.
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
        let (_, _) = tokio::join!(step, reg);
        let end = mux.closed().await;
        let _ = end.reason();
        drop(mux);
        let _ = peer.await;
    });
});
