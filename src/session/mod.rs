//! CP-side session machinery: one mTLS Session stream per agent container.
//!
//! - [`mux`]: routes Responses by command id (one reader per stream);
//! - [`classify`]: registry verdict on a connected peer;
//! - [`register`]: drives RegisterRequired → RegisterDone → re-lookup;
//! - [`init`]: the 7-step init plan and its executor.

pub mod classify;
pub mod init;
pub mod mux;
pub mod register;
