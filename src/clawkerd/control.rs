//! What the session keeps per running command, whatever its kind
//! (pipeline, pseudo-terminal, logs, copy): the frames that may follow a
//! command on its id (`Stdin`, `CloseStdin`, `Signal`, `Resize`,
//! `FlowGrant`) are routed through this trait, so the receive loop never
//! blocks on a child and never needs to know what kind of command runs.
//!
//! Dropping a control cancels its command (session teardown, or a panic
//! unwinding the session): every implementation kills what it started.

use bytes::Bytes;

/// A running command's session-side handle.
pub trait CommandControl: Send {
    /// Distinguishes a command from a later one reusing its id.
    fn generation(&self) -> u64;
    /// Queues stdin bytes; never blocks.
    fn stdin(&mut self, id: &str, data: Bytes);
    /// Ends stdin after everything queued. Idempotent.
    fn close_stdin(&mut self);
    /// Delivers a signal (what it reaches depends on the kind).
    fn signal(&self, id: &str, signo: i32);
    /// Window size of a pseudo-terminal command.
    fn resize(&self, _id: &str, _rows: u16, _cols: u16) -> Result<(), &'static str> {
        Err("resize: the command has no pseudo-terminal")
    }
    /// More output credit (flow-controlled commands only).
    fn grant(&self, _bytes: u64) {}
}
