//! CP-side session machinery: one mTLS Session stream per agent container.
//!
//! - [`mux`]: routes Responses by command id (one reader per stream);
//! - [`init`]: the 7-step init plan and its executor.

pub mod init;
pub mod mux;
