//! Panic message capture.
//!
//! A child's [`ChildLink`](crate::ChildLink) detects a panic from its `Drop`
//! (via [`std::thread::panicking`]) but the payload is not reachable from
//! there. A process-wide panic hook (chained in front of the previous hook,
//! so the usual message is still printed) stores the last panic message of
//! each thread, which the link then reports as
//! [`ExitReason::Panic`](crate::ExitReason::Panic).

use std::cell::RefCell;
use std::sync::Once;

thread_local! {
    static LAST_PANIC: RefCell<Option<String>> = const { RefCell::new(None) };
}

static INSTALL: Once = Once::new();

/// Install the capturing hook (idempotent). Called automatically when a
/// supervisor starts.
pub fn install_panic_hook() {
    INSTALL.call_once(|| {
        let previous = std::panic::take_hook();
        std::panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let msg = if let Some(s) = payload.downcast_ref::<&str>() {
                (*s).to_string()
            } else if let Some(s) = payload.downcast_ref::<String>() {
                s.clone()
            } else {
                "non-string panic payload".to_string()
            };
            let msg = match info.location() {
                Some(l) => format!("{msg} (at {}:{})", l.file(), l.line()),
                None => msg,
            };
            // try_with: the hook may run during thread-local destruction.
            let _ = LAST_PANIC.try_with(|c| {
                if let Ok(mut slot) = c.try_borrow_mut() {
                    *slot = Some(msg);
                }
            });
            previous(info);
        }));
    });
}

/// Message of the panic currently unwinding on this thread, if captured.
pub(crate) fn current_panic_message() -> String {
    LAST_PANIC
        .try_with(|c| c.try_borrow().ok().and_then(|s| s.clone()))
        .ok()
        .flatten()
        .unwrap_or_else(|| "panic (message not captured)".to_string())
}
