//! CP-side session machinery: one mTLS Session stream per agent container.
//!
//! - [`dial`]: one attempt — TCP + permissive mTLS + Hello/HelloAck;
//! - [`mux`]: routes Responses by command id (one reader per stream);
//! - [`command`]: one shell command run to completion over the mux (init
//!   steps and benchmarks use it);
//! - [`stream`]: a streaming, flow-controlled command (operator exec, cp,
//!   logs);
//! - [`control`]: the seam containment reaches sessions through (trust
//!   verdict, "the container moved");
//! - [`classify`]: registry verdict on a connected peer;
//! - [`register`]: drives RegisterRequired → RegisterDone → re-lookup;
//! - [`plan`]: the decision table (`HelloAck` → init / boot / nothing)
//!   and the steps of each plan, with the user's hooks;
//! - [`init`]: the executor of a start sequence and its events;
//! - [`terminate`]: ending a container whose start step failed;
//! - [`rotation`]: leaf rotation over the open session (the hold phase);
//! - [`lifecycle`]: the whole life of one session, reconnects included;
//! - [`actor`]: `SessionActor` per container, the `sessions` supervisor
//!   and [`Sessions`], the front door (dial, stop, live session).

pub mod actor;
pub mod classify;
pub mod command;
pub mod control;
pub mod dial;
pub mod init;
pub mod lifecycle;
pub mod mux;
pub mod plan;
pub mod register;
pub mod rotation;
pub mod stream;
pub mod terminate;

pub use actor::Sessions;
