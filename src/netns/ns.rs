//! Entering a container's network namespace from a multi-threaded host
//! process.
//!
//! `setns(fd, CLONE_NEWNET)` moves the *calling thread* only. Every piece of
//! work that must happen "inside" therefore runs on a fresh, dedicated
//! `std::thread` that ends afterwards: never a tokio worker, a
//! `spawn_blocking` thread or an actor's thread, any of which would go on
//! serving unrelated tasks inside the container's namespace. Children
//! spawned from that thread (`nft`) and netlink sockets opened on it
//! inherit the namespace. The result comes back over a oneshot channel, so
//! async callers await it without occupying a runtime thread.

use std::fs::File;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::MetadataExt;

use super::NetnsError;

/// An open handle on one network namespace (keeps it alive while held).
#[derive(Debug)]
pub struct NetNs {
    fd: OwnedFd,
    /// (st_dev, st_ino) of the nsfs inode: the namespace's identity.
    id: (u64, u64),
}

/// The calling thread's own namespace identity.
fn own_netns() -> Result<(u64, u64), NetnsError> {
    let own = std::fs::metadata("/proc/thread-self/ns/net")
        .map_err(|e| NetnsError::io("stat own netns", e))?;
    Ok((own.dev(), own.ino()))
}

impl NetNs {
    /// Opens `/proc/<pid>/ns/net` (a procfs open: no disk I/O). Refuses the
    /// caller's own namespace (a `--network host` container, or a pid that
    /// is not what we think): locking it would firewall the host.
    ///
    /// PID reuse: callers inspect the container, call this, then inspect
    /// again and check the pid is unchanged and the container still runs;
    /// a pid cannot be reused while its process lives, so the namespace
    /// opened here is the container's. From then on the fd is used, never
    /// the path.
    pub fn from_pid(pid: u32) -> Result<Self, NetnsError> {
        if pid == 0 {
            return Err(NetnsError::NoSuchProcess(pid));
        }
        let path = format!("/proc/{pid}/ns/net");
        let f = File::open(&path).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => NetnsError::NoSuchProcess(pid),
            _ => NetnsError::io(format!("open {path}"), e),
        })?;
        let md = f
            .metadata()
            .map_err(|e| NetnsError::io(format!("fstat {path}"), e))?;
        let id = (md.dev(), md.ino());
        if id == own_netns()? {
            return Err(NetnsError::HostNamespace(pid));
        }
        Ok(Self { fd: f.into(), id })
    }

    /// Runs `f` on a new thread that has joined this namespace and returns
    /// its result. The thread is never reused.
    pub async fn run<T, F>(&self, f: F) -> Result<T, NetnsError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, NetnsError> + Send + 'static,
    {
        let fd = self
            .fd
            .try_clone()
            .map_err(|e| NetnsError::io("dup netns fd", e))?;
        let want = self.id;
        on_own_thread(move || {
            // SAFETY: a plain syscall on an fd we own; it moves this
            // (dedicated, short-lived) thread only.
            if unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                let e = std::io::Error::last_os_error();
                return Err(if e.raw_os_error() == Some(libc::EPERM) {
                    NetnsError::Unsupported(
                        "setns(CLONE_NEWNET) refused: the CP needs root (CAP_SYS_ADMIN) on the container's host".into(),
                    )
                } else {
                    NetnsError::io("setns(CLONE_NEWNET)", e)
                });
            }
            // Prove the switch happened before touching anything.
            if own_netns()? != want {
                return Err(NetnsError::SetnsMismatch);
            }
            f()
        })
        .await
    }

    /// Names of the current thread's namespace interfaces (`if_nameindex`
    /// asks the kernel over a socket of the calling thread's namespace, so
    /// call it inside [`NetNs::run`]).
    pub fn interfaces_here() -> Result<Vec<String>, NetnsError> {
        // SAFETY: if_nameindex returns a heap array terminated by a zero
        // entry, freed with if_freenameindex; names are NUL-terminated.
        unsafe {
            let p = libc::if_nameindex();
            if p.is_null() {
                return Err(NetnsError::io(
                    "if_nameindex",
                    std::io::Error::last_os_error(),
                ));
            }
            let mut out = Vec::new();
            let mut i = 0;
            loop {
                let e = &*p.add(i);
                if e.if_index == 0 || e.if_name.is_null() {
                    break;
                }
                out.push(
                    std::ffi::CStr::from_ptr(e.if_name)
                        .to_string_lossy()
                        .into_owned(),
                );
                i += 1;
            }
            libc::if_freenameindex(p);
            Ok(out)
        }
    }
}

/// Runs blocking `f` (process spawns, netlink round trips) on a fresh
/// `std::thread` and awaits its result, so neither an actor's thread nor a
/// shared tokio worker blocks on it.
pub async fn on_own_thread<T, F>(f: F) -> Result<T, NetnsError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, NetnsError> + Send + 'static,
{
    let (tx, rx) = tokio::sync::oneshot::channel();
    std::thread::Builder::new()
        .name("clawker-netns".into())
        .spawn(move || {
            let _ = tx.send(f());
        })
        .map_err(|e| NetnsError::io("spawn netns thread", e))?;
    // A dropped sender means the thread panicked before answering.
    rx.await.map_err(|_| NetnsError::WorkerGone)?
}
