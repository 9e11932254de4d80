//! Shared helpers for the integration tests, one file per concern. Every
//! item is re-exported here, so a test says `mod common;` and
//! `use common::*;` (or names what it uses).
//!
//! - [`clawkerd`]: the real `clawkerd` binary as a child process on
//!   loopback, the PKI and bootstrap dir it boots with, its captured logs.
//! - [`cp_client`]: the CP side of a clawkerd connection (real mTLS,
//!   `Session` streams) and the command builders.
//! - [`swarm`]: a private Docker Swarm (scripts/swarm-cluster) and the CP
//!   deployed on it as a service, observed through its audit log.
//! - [`agent_api`]: the CP's agent listener (Register + token endpoint) on
//!   loopback with a real redb file, and clients for it.
//! - [`pty`]: a real pseudo-terminal to drive the CLI as a person would.
//! - [`docker_env`]: one Docker e2e test's state dir, network, image,
//!   labels (removed on drop) and event recording.
//! - Below: small helpers that fit none of them.
//!
//! Each test binary compiles this whole module and uses only part of it,
//! hence `allow(dead_code)`.

#![allow(dead_code)]

pub mod agent_api;
pub mod clawkerd;
pub mod cp_client;
pub mod docker_env;
pub mod pty;
pub mod swarm;

// A binary that uses none of a submodule's items would call its glob unused.
#[allow(unused_imports)]
pub use agent_api::*;
#[allow(unused_imports)]
pub use clawkerd::*;
#[allow(unused_imports)]
pub use cp_client::*;
#[allow(unused_imports)]
pub use docker_env::*;
#[allow(unused_imports)]
pub use pty::*;

use std::path::Path;

use base64::Engine;

// ---- misc -----------------------------------------------------------------

/// Writes `contents` to `path` (helper for scripts).
pub fn write(path: &Path, contents: &str) {
    std::fs::write(path, contents).unwrap();
}

/// base64url without padding (JWT segments).
pub fn b64(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(data)
}

/// Seconds since the Unix epoch (JWT `iat`/`exp`).
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}
