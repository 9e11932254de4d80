//! CP-side session machinery: one mTLS Session stream per agent container.
//!
//! - [`dial`]: one attempt — TCP + permissive mTLS + Hello/HelloAck;
//! - [`mux`]: routes Responses by command id (one reader per stream);
//! - [`classify`]: registry verdict on a connected peer;
//! - [`register`]: drives RegisterRequired → RegisterDone → re-lookup;
//! - [`init`]: the 7-step init plan and its executor;
//! - [`lifecycle`]: the whole life of one session, reconnects included;
//! - [`actor`]: `SessionActor` per container and the deduplicating `Dialer`.

pub mod actor;
pub mod classify;
pub mod dial;
pub mod init;
pub mod lifecycle;
pub mod mux;
pub mod register;
