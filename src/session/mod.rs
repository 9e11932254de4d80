//! CP-side session machinery: one mTLS Session stream per agent container.
//!
//! - [`dial`]: one attempt — TCP + permissive mTLS + Hello/HelloAck;
//! - [`mux`]: routes Responses by command id (one reader per stream);
//! - [`command`]: one shell command run to completion over the mux (init
//!   steps, containment, benchmarks all use it);
//! - [`commands`]: the seam other actors run commands through;
//! - [`classify`]: registry verdict on a connected peer;
//! - [`register`]: drives RegisterRequired → RegisterDone → re-lookup;
//! - [`plan`]: the decision table (`HelloAck` → init / boot / nothing)
//!   and the steps of each plan, with the user's hooks;
//! - [`init`]: the executor of a start sequence and its events;
//! - [`terminate`]: ending a container whose start step failed;
//! - [`lifecycle`]: the whole life of one session, reconnects included;
//! - [`actor`]: `SessionActor` per container, the `sessions` supervisor
//!   and [`Sessions`], the front door (dial, stop, live session).

pub mod actor;
pub mod classify;
pub mod command;
pub mod commands;
pub mod dial;
pub mod init;
pub mod lifecycle;
pub mod mux;
pub mod plan;
pub mod register;
pub mod terminate;

pub use actor::Sessions;
