//! A real pseudo-terminal for driving the CLI the way a person at a
//! terminal would: the test holds the master side, the CLI gets the slave
//! as its controlling terminal (own session) and stdin/stdout/stderr.
//! Also used by the `system` bench for the keystroke echo round trip.
//!
//! Everything here blocks; async tests call it through `spawn_blocking`.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The master side of a pty pair and the slave's path.
pub struct Pty {
    pub master: OwnedFd,
    pub slave_path: PathBuf,
}

impl Pty {
    /// Opens a pair with the given window size.
    pub fn open(rows: u16, cols: u16) -> io::Result<Self> {
        // SAFETY: libc pty calls on descriptors and buffers we own; every
        // result is checked.
        unsafe {
            let m = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
            if m < 0 {
                return Err(io::Error::last_os_error());
            }
            let master = OwnedFd::from_raw_fd(m);
            if libc::grantpt(m) != 0 || libc::unlockpt(m) != 0 {
                return Err(io::Error::last_os_error());
            }
            let mut name = [0 as libc::c_char; 128];
            if libc::ptsname_r(m, name.as_mut_ptr(), name.len()) != 0 {
                return Err(io::Error::last_os_error());
            }
            let slave_path =
                PathBuf::from(CStr::from_ptr(name.as_ptr()).to_string_lossy().into_owned());
            let pty = Self { master, slave_path };
            pty.resize(rows, cols)?;
            Ok(pty)
        }
    }

    /// Sets the window size (the kernel sends SIGWINCH to the slave's
    /// foreground process group).
    pub fn resize(&self, rows: u16, cols: u16) -> io::Result<()> {
        let ws = libc::winsize {
            ws_row: rows,
            ws_col: cols,
            ws_xpixel: 0,
            ws_ypixel: 0,
        };
        // SAFETY: TIOCSWINSZ reads one winsize from a live local.
        if unsafe { libc::ioctl(self.master.as_raw_fd(), libc::TIOCSWINSZ, &ws) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn open_slave(&self) -> io::Result<OwnedFd> {
        let path = std::ffi::CString::new(self.slave_path.to_string_lossy().as_bytes())
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: open with a C string; result checked.
        let fd = unsafe {
            libc::open(
                path.as_ptr(),
                libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC,
            )
        };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor we own.
        Ok(unsafe { OwnedFd::from_raw_fd(fd) })
    }

    /// Spawns `cmd` in a new session whose controlling terminal is the
    /// slave (stdin, stdout, stderr all on it), as a terminal emulator
    /// starts a shell.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<Child> {
        let slave = self.open_slave()?;
        cmd.stdin(Stdio::from(slave.try_clone()?))
            .stdout(Stdio::from(slave.try_clone()?))
            .stderr(Stdio::from(slave));
        // SAFETY: async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 || libc::ioctl(0, libc::TIOCSCTTY, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.spawn()
    }

    /// The slave's current terminal settings (what the CLI left them as).
    pub fn termios(&self) -> io::Result<Termios> {
        let slave = self.open_slave()?;
        // SAFETY: tcgetattr into a zeroed local.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        if unsafe { libc::tcgetattr(slave.as_raw_fd(), &mut t) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Termios(t))
    }

    /// Types `bytes`.
    pub fn write(&self, mut bytes: &[u8]) -> io::Result<()> {
        while !bytes.is_empty() {
            // SAFETY: write from a live slice.
            let n =
                unsafe { libc::write(self.master.as_raw_fd(), bytes.as_ptr().cast(), bytes.len()) };
            if n < 0 {
                let e = io::Error::last_os_error();
                if e.kind() == io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(e);
            }
            bytes = &bytes[n as usize..];
        }
        Ok(())
    }

    /// Reads whatever arrives within `timeout` (at most one read).
    pub fn read_some(&self, timeout: Duration) -> io::Result<Vec<u8>> {
        let mut pfd = libc::pollfd {
            fd: self.master.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = timeout.as_millis().min(i32::MAX as u128) as i32;
        // SAFETY: poll on one live pollfd.
        let r = unsafe { libc::poll(&mut pfd, 1, ms) };
        if r <= 0 {
            return Ok(Vec::new());
        }
        let mut buf = vec![0u8; 64 * 1024];
        // SAFETY: read into our buffer.
        let n = unsafe { libc::read(self.master.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            // EIO: every slave descriptor closed (the CLI exited).
            return Err(io::Error::last_os_error());
        }
        buf.truncate(n as usize);
        Ok(buf)
    }

    /// Reads until the accumulated output (starting with `seen`) contains
    /// `want`; returns it all.
    pub fn read_until(
        &self,
        seen: &mut String,
        want: &str,
        timeout: Duration,
    ) -> Result<(), String> {
        let deadline = Instant::now() + timeout;
        while !seen.contains(want) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "timed out waiting for {want:?}; terminal shows {seen:?}"
                ));
            }
            match self.read_some(left.min(Duration::from_millis(200))) {
                Ok(b) => seen.push_str(&String::from_utf8_lossy(&b)),
                Err(e) => return Err(format!("{e} waiting for {want:?}; terminal shows {seen:?}")),
            }
        }
        Ok(())
    }
}

/// Terminal settings, compared field by field.
#[derive(Clone, Copy)]
pub struct Termios(pub libc::termios);

impl Termios {
    pub fn canonical(&self) -> bool {
        self.0.c_lflag & libc::ICANON != 0
    }
    pub fn echoes(&self) -> bool {
        self.0.c_lflag & libc::ECHO != 0
    }
}

impl PartialEq for Termios {
    fn eq(&self, o: &Self) -> bool {
        let (a, b) = (&self.0, &o.0);
        a.c_iflag == b.c_iflag
            && a.c_oflag == b.c_oflag
            && a.c_cflag == b.c_cflag
            && a.c_lflag == b.c_lflag
            && a.c_cc == b.c_cc
    }
}

impl std::fmt::Debug for Termios {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "termios{{iflag:{:o} oflag:{:o} cflag:{:o} lflag:{:o}}}",
            self.0.c_iflag, self.0.c_oflag, self.0.c_cflag, self.0.c_lflag
        )
    }
}
