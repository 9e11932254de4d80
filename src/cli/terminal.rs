//! The local terminal during `clawker agent exec -t` / `shell`: raw mode
//! that is always undone, and the window size.
//!
//! [`RawMode`] restores the saved settings when dropped — on a normal end,
//! on an error return, on a broken session (all of which return through
//! the guard's scope) and while unwinding from a panic. The signals that
//! end the CLI (SIGTERM, SIGHUP) are caught by the exec loop, which then
//! returns through the guard too; SIGKILL is the one path nothing can
//! cover.

use std::io;
use std::os::fd::RawFd;

/// The terminal in raw mode until dropped.
pub struct RawMode {
    fd: RawFd,
    saved: libc::termios,
}

impl RawMode {
    /// Puts `fd`'s terminal in raw mode (cfmakeraw: no echo, no line
    /// editing, no signal keys, no output processing — the remote pty
    /// does all of that), remembering how it was.
    pub fn enter(fd: RawFd) -> io::Result<Self> {
        // SAFETY: tcgetattr/cfmakeraw/tcsetattr on a zeroed local termios
        // and a descriptor the caller owns; results checked.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(fd, &mut saved) != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            if libc::tcsetattr(fd, libc::TCSANOW, &raw) != 0 {
                return Err(io::Error::last_os_error());
            }
            Ok(Self { fd, saved })
        }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        // SAFETY: tcsetattr with the termios we read in `enter`.
        unsafe { libc::tcsetattr(self.fd, libc::TCSANOW, &self.saved) };
    }
}

/// Whether `fd` is a terminal.
pub fn is_tty(fd: RawFd) -> bool {
    // SAFETY: isatty only inspects the descriptor.
    unsafe { libc::isatty(fd) == 1 }
}

/// The window size of `fd`'s terminal (rows, cols), if it has one.
pub fn size(fd: RawFd) -> Option<(u16, u16)> {
    // SAFETY: TIOCGWINSZ writes one winsize into a zeroed local.
    let mut ws: libc::winsize = unsafe { std::mem::zeroed() };
    if unsafe { libc::ioctl(fd, libc::TIOCGWINSZ, &mut ws) } != 0 || ws.ws_row == 0 {
        return None;
    }
    Some((ws.ws_row, ws.ws_col))
}
