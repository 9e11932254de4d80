//! Tar streams for `clawker agent cp`, both ends: [`pack`] a path into a
//! tar stream, and [`unpack`] a tar stream into a directory without ever
//! leaving it.
//!
//! Used by clawkerd (copy in and out of the container) and by the CLI (the
//! host side), so it sits in the foundation layer and knows nothing of
//! either.
//!
//! Why our own unpacker instead of `tar::Archive::unpack`: the tar crate
//! checks paths, then writes through them, so a process racing the
//! extraction (an agent inside its container, where clawkerd extracts as
//! root) could swap a directory for a symlink between the check and the
//! write. Here every path is walked one component at a time from a
//! directory descriptor with `O_NOFOLLOW | O_DIRECTORY`, and every entry is
//! created relative to its parent's descriptor (`mkdirat`, `openat` with
//! `O_EXCL | O_NOFOLLOW`, `symlinkat`, `linkat` without following). The
//! kernel, not a check, keeps every write beneath the destination; a
//! symlink is never followed, whoever made it and whenever.
//!
//! Refused outright (the whole unpack fails): absolute entry paths, `..`
//! components, symlinks whose target is absolute or climbs above the
//! destination, hard links to anything but an earlier entry. Skipped and
//! counted: device nodes and FIFOs (a device node from an untrusted
//! container is a way around file permissions on the host).

use std::ffi::{CString, OsStr};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};

/// Why a pack or unpack failed.
#[derive(Debug, thiserror::Error)]
pub enum ArchiveError {
    /// The source or destination path itself is unusable.
    #[error("{path}: {source}")]
    Path { path: String, source: io::Error },
    /// An entry would land outside the destination, or is malformed.
    #[error("refused entry {entry:?}: {why}")]
    Refused { entry: String, why: &'static str },
    /// Reading the stream or writing the file system failed.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
}

impl ArchiveError {
    fn io(what: impl Into<String>) -> impl FnOnce(io::Error) -> Self {
        let what = what.into();
        move |source| Self::Io { what, source }
    }
}

/// Writes `src` (file, directory tree or symlink, never followed) as a tar
/// stream whose top-level entry is `name`. Modes, numeric owners and
/// mtimes are kept.
pub fn pack(src: &Path, name: &str, out: impl Write) -> Result<(), ArchiveError> {
    let meta = std::fs::symlink_metadata(src).map_err(|source| ArchiveError::Path {
        path: src.display().to_string(),
        source,
    })?;
    let mut b = tar::Builder::new(out);
    b.follow_symlinks(false);
    b.mode(tar::HeaderMode::Complete);
    let what = || format!("packing {}", src.display());
    if meta.is_dir() {
        b.append_dir_all(name, src)
            .map_err(ArchiveError::io(what()))?;
    } else {
        b.append_path_with_name(src, name)
            .map_err(ArchiveError::io(what()))?;
    }
    b.into_inner()
        .and_then(|mut w| w.flush())
        .map_err(ArchiveError::io(what()))
}

/// Who owns what [`unpack`] creates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Owner {
    /// The numeric uid/gid recorded in the archive (needs root).
    Preserve,
    /// Everything belongs to this uid/gid (needs root unless it is ours).
    Fixed { uid: u32, gid: u32 },
    /// Whoever runs the unpack (no chown at all).
    Caller,
}

/// How [`unpack`] treats entries.
#[derive(Debug, Clone)]
pub struct UnpackOptions {
    pub owner: Owner,
    /// Replace the first path component of every entry (and of hard-link
    /// targets) with this name: `cp SRC DST` onto a DST that does not
    /// exist yet creates DST, not DST/SRC.
    pub rename_top: Option<String>,
    /// Clear setuid/setgid bits (host-side extraction of an untrusted
    /// container's files).
    pub strip_setid: bool,
}

impl Default for UnpackOptions {
    fn default() -> Self {
        Self {
            owner: Owner::Caller,
            rename_top: None,
            strip_setid: false,
        }
    }
}

/// What an unpack did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UnpackStats {
    pub entries: u64,
    /// Device nodes and FIFOs that were not created.
    pub skipped: u64,
    /// Bytes of file content written.
    pub bytes: u64,
}

/// Extracts the tar stream `input` beneath the existing directory `dest`
/// (see the module doc for what is refused and why it cannot escape).
pub fn unpack(
    input: impl Read,
    dest: &Path,
    opts: &UnpackOptions,
) -> Result<UnpackStats, ArchiveError> {
    let root = open_dir_at(libc::AT_FDCWD, dest.as_os_str(), true).map_err(|source| {
        ArchiveError::Path {
            path: dest.display().to_string(),
            source,
        }
    })?;
    let mut archive = tar::Archive::new(input);
    let mut stats = UnpackStats::default();
    // Directory modes and mtimes are applied last, deepest first: a
    // read-only directory must still accept its children, and writing a
    // child changes its parent's mtime.
    let mut dirs: Vec<(Vec<PathBuf>, Meta)> = Vec::new();
    let entries = archive
        .entries()
        .map_err(ArchiveError::io("reading the tar stream"))?;
    for entry in entries {
        let mut entry = entry.map_err(ArchiveError::io("reading the tar stream"))?;
        let raw = String::from_utf8_lossy(&entry.path_bytes()).into_owned();
        let refuse = |why| ArchiveError::Refused {
            entry: raw.clone(),
            why,
        };
        let Some(rel) =
            relative(&entry.path_bytes(), opts.rename_top.as_deref()).map_err(&refuse)?
        else {
            // "." or "./": the destination itself; nothing to create.
            continue;
        };
        let header = entry.header();
        let kind = header.entry_type();
        let meta = Meta::of(header, opts).map_err(ArchiveError::io(format!("header of {raw}")))?;
        let (parents, name) = rel.split_at(rel.len() - 1);
        let name = &name[0];
        let parent = walk(&root, parents, true).map_err(|e| match e.raw_os_error() {
            Some(libc::ELOOP) | Some(libc::ENOTDIR) => {
                refuse("its path goes through a symlink or a non-directory")
            }
            _ => ArchiveError::Io {
                what: format!("creating the parents of {raw}"),
                source: e,
            },
        })?;
        let pfd = parent.as_raw_fd();
        let cname = cstr(name.as_os_str()).map_err(&refuse)?;
        let io_err = |what: &str| ArchiveError::io(format!("{what} {raw}"));
        if kind.is_dir() {
            // SAFETY: mkdirat with a live dirfd and a NUL-terminated name.
            let rc = unsafe { libc::mkdirat(pfd, cname.as_ptr(), 0o700) };
            if rc != 0 {
                let e = io::Error::last_os_error();
                if e.raw_os_error() != Some(libc::EEXIST) {
                    return Err(io_err("creating directory")(e));
                }
                // Exists: it must be a real directory (not a symlink to one).
                open_dir_at(pfd, name.as_os_str(), false).map_err(|_| {
                    refuse("a non-directory (or a symlink) is in the way of this directory")
                })?;
            }
            dirs.push((rel.clone(), meta));
        } else if kind.is_file() || kind.is_contiguous() || kind.is_gnu_sparse() {
            remove_non_dir(pfd, &cname).map_err(io_err("replacing"))?;
            // SAFETY: openat with a live dirfd; O_EXCL|O_NOFOLLOW means we
            // only ever write a file we just created.
            let fd = unsafe {
                libc::openat(
                    pfd,
                    cname.as_ptr(),
                    libc::O_WRONLY
                        | libc::O_CREAT
                        | libc::O_EXCL
                        | libc::O_NOFOLLOW
                        | libc::O_CLOEXEC,
                    0o600,
                )
            };
            if fd < 0 {
                return Err(io_err("creating")(io::Error::last_os_error()));
            }
            // SAFETY: a fresh descriptor we own.
            let mut file = std::fs::File::from(unsafe { OwnedFd::from_raw_fd(fd) });
            stats.bytes += io::copy(&mut entry, &mut file).map_err(io_err("writing"))?;
            meta.apply_fd(&file)
                .map_err(io_err("setting owner/mode/mtime of"))?;
        } else if kind.is_symlink() {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| refuse("symlink without a target"))?;
            check_symlink_target(parents, &target).map_err(&refuse)?;
            let ctarget = CString::new(target.into_owned())
                .map_err(|_| refuse("symlink target contains NUL"))?;
            remove_non_dir(pfd, &cname).map_err(io_err("replacing"))?;
            // SAFETY: symlinkat with a live dirfd and NUL-terminated strings.
            if unsafe { libc::symlinkat(ctarget.as_ptr(), pfd, cname.as_ptr()) } != 0 {
                return Err(io_err("creating symlink")(io::Error::last_os_error()));
            }
            meta.apply_link(pfd, &cname)
                .map_err(io_err("setting owner/mtime of"))?;
        } else if kind.is_hard_link() {
            let target = entry
                .link_name_bytes()
                .ok_or_else(|| refuse("hard link without a target"))?;
            let trel = relative(&target, opts.rename_top.as_deref())
                .map_err(&refuse)?
                .ok_or_else(|| refuse("hard link to the destination itself"))?;
            let (tparents, tname) = trel.split_at(trel.len() - 1);
            let tdir = walk(&root, tparents, false)
                .map_err(|_| refuse("hard link target is not an earlier entry"))?;
            let ctname = cstr(tname[0].as_os_str()).map_err(&refuse)?;
            remove_non_dir(pfd, &cname).map_err(io_err("replacing"))?;
            // SAFETY: linkat without AT_SYMLINK_FOLLOW links the entry
            // itself, both names relative to descriptors beneath the root.
            let rc =
                unsafe { libc::linkat(tdir.as_raw_fd(), ctname.as_ptr(), pfd, cname.as_ptr(), 0) };
            if rc != 0 {
                return Err(refuse("hard link target is not an earlier entry"));
            }
        } else if kind.is_pax_global_extensions()
            || kind.is_pax_local_extensions()
            || kind.is_gnu_longname()
            || kind.is_gnu_longlink()
        {
            // Consumed by the tar reader; nothing to create.
            continue;
        } else {
            stats.skipped += 1;
            continue;
        }
        stats.entries += 1;
    }
    dirs.sort_by_key(|(rel, _)| std::cmp::Reverse(rel.len()));
    for (rel, meta) in dirs {
        let dir = walk(&root, &rel, false).map_err(ArchiveError::io(format!(
            "reopening directory {}",
            rel.iter().collect::<PathBuf>().display()
        )))?;
        let file = std::fs::File::from(dir);
        meta.apply_fd(&file).map_err(ArchiveError::io(format!(
            "setting owner/mode/mtime of directory {}",
            rel.iter().collect::<PathBuf>().display()
        )))?;
    }
    Ok(stats)
}

/// An entry path as plain components beneath the destination, with the
/// first replaced by `rename_top`. `Ok(None)` for the destination itself.
fn relative(raw: &[u8], rename_top: Option<&str>) -> Result<Option<Vec<PathBuf>>, &'static str> {
    if raw.contains(&0) {
        return Err("path contains NUL");
    }
    let path = Path::new(OsStr::from_bytes(raw));
    let mut out: Vec<PathBuf> = Vec::new();
    for c in path.components() {
        match c {
            Component::Normal(n) => out.push(PathBuf::from(n)),
            Component::CurDir => {}
            Component::RootDir | Component::Prefix(_) => return Err("absolute path"),
            Component::ParentDir => return Err("path contains \"..\""),
        }
    }
    if out.is_empty() {
        return Ok(None);
    }
    if let Some(top) = rename_top {
        out[0] = PathBuf::from(top);
    }
    Ok(Some(out))
}

/// A symlink at `parents/<name>` pointing at `target` must be relative and
/// must not climb above the destination (checked lexically: every
/// component it resolves through is itself beneath the root, and never
/// followed while unpacking).
fn check_symlink_target(parents: &[PathBuf], target: &[u8]) -> Result<(), &'static str> {
    if target.is_empty() {
        return Err("symlink with an empty target");
    }
    if target.contains(&0) {
        return Err("symlink target contains NUL");
    }
    let mut depth = parents.len() as i64;
    for c in Path::new(OsStr::from_bytes(target)).components() {
        match c {
            Component::RootDir | Component::Prefix(_) => {
                return Err("symlink points to an absolute path");
            }
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return Err("symlink points outside the destination");
                }
            }
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
        }
    }
    Ok(())
}

fn cstr(s: &OsStr) -> Result<CString, &'static str> {
    CString::new(s.as_bytes()).map_err(|_| "name contains NUL")
}

/// Opens a directory relative to `dirfd` without following a final
/// symlink (`O_NOFOLLOW` unless `follow`, which only the root uses).
fn open_dir_at(dirfd: i32, name: &OsStr, follow: bool) -> io::Result<OwnedFd> {
    let c =
        CString::new(name.as_bytes()).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let mut flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    if !follow {
        flags |= libc::O_NOFOLLOW;
    }
    // SAFETY: openat with a valid dirfd (or AT_FDCWD) and a C string.
    let fd = unsafe { libc::openat(dirfd, c.as_ptr(), flags) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh descriptor we own.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Walks `comps` from `root`, one `O_NOFOLLOW` directory open at a time;
/// missing directories are created (0755) when `create`.
fn walk(root: &OwnedFd, comps: &[PathBuf], create: bool) -> io::Result<OwnedFd> {
    let mut cur = root.try_clone()?;
    for c in comps {
        let next = match open_dir_at(cur.as_raw_fd(), c.as_os_str(), false) {
            Err(e) if create && e.raw_os_error() == Some(libc::ENOENT) => {
                let name = CString::new(c.as_os_str().as_bytes())
                    .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
                // SAFETY: mkdirat with a live dirfd and a C string.
                if unsafe { libc::mkdirat(cur.as_raw_fd(), name.as_ptr(), 0o755) } != 0 {
                    let e = io::Error::last_os_error();
                    if e.raw_os_error() != Some(libc::EEXIST) {
                        return Err(e);
                    }
                }
                open_dir_at(cur.as_raw_fd(), c.as_os_str(), false)?
            }
            other => other?,
        };
        cur = next;
    }
    Ok(cur)
}

/// Removes whatever non-directory sits at `name` (a file or a symlink,
/// never what a symlink points to), so a new entry replaces it.
fn remove_non_dir(dirfd: i32, name: &CString) -> io::Result<()> {
    // SAFETY: unlinkat with a live dirfd; flags 0 never removes directories.
    if unsafe { libc::unlinkat(dirfd, name.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    match e.raw_os_error() {
        Some(libc::ENOENT) => Ok(()),
        _ => Err(e),
    }
}

/// Owner, mode and mtime of one entry, as they will be applied.
#[derive(Debug, Clone, Copy)]
struct Meta {
    owner: Option<(u32, u32)>,
    mode: u32,
    mtime: i64,
}

impl Meta {
    fn of(h: &tar::Header, opts: &UnpackOptions) -> io::Result<Self> {
        let owner = match opts.owner {
            Owner::Preserve => Some((
                u32::try_from(h.uid()?).unwrap_or(u32::MAX),
                u32::try_from(h.gid()?).unwrap_or(u32::MAX),
            )),
            Owner::Fixed { uid, gid } => Some((uid, gid)),
            Owner::Caller => None,
        };
        let mut mode = h.mode()? & 0o7777;
        if opts.strip_setid {
            mode &= !0o6000;
        }
        Ok(Self {
            owner,
            mode,
            mtime: i64::try_from(h.mtime()?).unwrap_or(0),
        })
    }

    /// chown first: the kernel clears setuid bits on chown.
    fn apply_fd(&self, f: &std::fs::File) -> io::Result<()> {
        let fd = f.as_raw_fd();
        if let Some((uid, gid)) = self.owner {
            // SAFETY: fchown on a descriptor we own.
            if unsafe { libc::fchown(fd, uid, gid) } != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: fchmod on a descriptor we own.
        if unsafe { libc::fchmod(fd, self.mode) } != 0 {
            return Err(io::Error::last_os_error());
        }
        let times = [self.timespec(), self.timespec()];
        // SAFETY: futimens reads two timespecs from a live array.
        if unsafe { libc::futimens(fd, times.as_ptr()) } != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// A symlink: owner and mtime of the link itself (it has no mode).
    fn apply_link(&self, dirfd: i32, name: &CString) -> io::Result<()> {
        if let Some((uid, gid)) = self.owner {
            // SAFETY: fchownat on the link itself (AT_SYMLINK_NOFOLLOW).
            let rc = unsafe {
                libc::fchownat(dirfd, name.as_ptr(), uid, gid, libc::AT_SYMLINK_NOFOLLOW)
            };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
        }
        let times = [self.timespec(), self.timespec()];
        // SAFETY: utimensat on the link itself.
        let rc = unsafe {
            libc::utimensat(
                dirfd,
                name.as_ptr(),
                times.as_ptr(),
                libc::AT_SYMLINK_NOFOLLOW,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    fn timespec(&self) -> libc::timespec {
        libc::timespec {
            tv_sec: self.mtime as libc::time_t,
            tv_nsec: 0,
        }
    }
}

/// A blocking [`Read`] over chunks arriving on a channel: the tar reader
/// runs on a blocking thread while the chunks come from an async stream.
/// The channel closing is the end of the stream. `on_consumed` hears how
/// many bytes the reader took (stdin flow control).
pub struct ChunkReader<F: FnMut(usize)> {
    rx: std::sync::mpsc::Receiver<bytes::Bytes>,
    cur: bytes::Bytes,
    on_consumed: F,
}

impl<F: FnMut(usize)> ChunkReader<F> {
    pub fn new(rx: std::sync::mpsc::Receiver<bytes::Bytes>, on_consumed: F) -> Self {
        Self {
            rx,
            cur: bytes::Bytes::new(),
            on_consumed,
        }
    }
}

impl<F: FnMut(usize)> Read for ChunkReader<F> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.cur.is_empty() {
            match self.rx.recv() {
                Ok(b) => self.cur = b,
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len());
        buf[..n].copy_from_slice(&self.cur.split_to(n));
        (self.on_consumed)(n);
        Ok(n)
    }
}

/// A blocking [`Write`] that hands fixed-size chunks to `sink` (the tar
/// writer runs on a blocking thread; the chunks go to an async stream).
/// `sink` returning an error (the receiver is gone) ends the write.
pub struct ChunkWriter<F: FnMut(bytes::Bytes) -> io::Result<()>> {
    buf: Vec<u8>,
    chunk: usize,
    sink: F,
}

impl<F: FnMut(bytes::Bytes) -> io::Result<()>> ChunkWriter<F> {
    pub fn new(chunk: usize, sink: F) -> Self {
        Self {
            buf: Vec::with_capacity(chunk),
            chunk,
            sink,
        }
    }
}

impl<F: FnMut(bytes::Bytes) -> io::Result<()>> Write for ChunkWriter<F> {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        let n = data.len().min(self.chunk - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        if self.buf.len() >= self.chunk {
            self.flush()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.buf.is_empty() {
            return Ok(());
        }
        let full = std::mem::replace(&mut self.buf, Vec::with_capacity(self.chunk));
        (self.sink)(bytes::Bytes::from(full))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt, symlink};

    fn tar_of(build: impl FnOnce(&mut tar::Builder<Vec<u8>>)) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        build(&mut b);
        b.into_inner().unwrap()
    }

    fn header(kind: tar::EntryType, size: u64) -> tar::Header {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(kind);
        h.set_size(size);
        h.set_mode(0o644);
        h
    }

    /// The tar crate's builder refuses to write "..": write the raw name.
    fn raw_entry(b: &mut tar::Builder<Vec<u8>>, name: &[u8], kind: tar::EntryType, link: &[u8]) {
        let mut h = header(kind, 0);
        let gnu = h.as_gnu_mut().unwrap();
        gnu.name[..name.len()].copy_from_slice(name);
        gnu.linkname[..link.len()].copy_from_slice(link);
        h.set_cksum();
        b.append(&h, io::empty()).unwrap();
    }

    #[test]
    fn round_trip_keeps_modes_symlinks_and_mtimes() {
        let src = tempfile::tempdir().unwrap();
        let top = src.path().join("tree");
        std::fs::create_dir_all(top.join("sub/deeper")).unwrap();
        std::fs::write(top.join("run.sh"), "#!/bin/sh\n").unwrap();
        std::fs::set_permissions(top.join("run.sh"), std::fs::Permissions::from_mode(0o750))
            .unwrap();
        std::fs::write(top.join("sub/secret"), "s").unwrap();
        std::fs::set_permissions(
            top.join("sub/secret"),
            std::fs::Permissions::from_mode(0o600),
        )
        .unwrap();
        std::fs::set_permissions(
            top.join("sub/deeper"),
            std::fs::Permissions::from_mode(0o555),
        )
        .unwrap();
        symlink("../run.sh", top.join("sub/link")).unwrap();
        let mut stream = Vec::new();
        pack(&top, "tree", &mut stream).unwrap();

        let dst = tempfile::tempdir().unwrap();
        let stats = unpack(&stream[..], dst.path(), &UnpackOptions::default()).unwrap();
        assert_eq!(stats.skipped, 0);
        let got = dst.path().join("tree");
        let mode = |p: &str| std::fs::symlink_metadata(got.join(p)).unwrap().mode() & 0o7777;
        assert_eq!(mode("run.sh"), 0o750);
        assert_eq!(mode("sub/secret"), 0o600);
        assert_eq!(mode("sub/deeper"), 0o555);
        assert_eq!(
            std::fs::read_link(got.join("sub/link")).unwrap(),
            Path::new("../run.sh")
        );
        let mtime = |p: &Path| std::fs::metadata(p).unwrap().mtime();
        assert_eq!(mtime(&got.join("run.sh")), mtime(&top.join("run.sh")));

        // Renamed top: DST did not exist, so the tree is created as DST.
        let stats = unpack(
            &stream[..],
            dst.path(),
            &UnpackOptions {
                rename_top: Some("copy".into()),
                ..UnpackOptions::default()
            },
        )
        .unwrap();
        assert!(stats.entries >= 5);
        assert_eq!(
            std::fs::read(dst.path().join("copy/sub/secret")).unwrap(),
            b"s"
        );
    }

    #[test]
    fn escaping_entries_are_refused() {
        let cases: Vec<(&[u8], tar::EntryType, &[u8], &str)> = vec![
            (b"/etc/evil", tar::EntryType::Regular, b"", "absolute path"),
            (b"a/../../evil", tar::EntryType::Regular, b"", "\"..\""),
            (b"l", tar::EntryType::Symlink, b"/etc", "absolute"),
            (b"d/l", tar::EntryType::Symlink, b"../../x", "outside"),
            (b"h", tar::EntryType::Link, b"../outside", "\"..\""),
        ];
        for (name, kind, link, want) in cases {
            let stream = tar_of(|b| raw_entry(b, name, kind, link));
            let dst = tempfile::tempdir().unwrap();
            let e = unpack(&stream[..], dst.path(), &UnpackOptions::default()).unwrap_err();
            assert!(e.to_string().contains(want), "{name:?}: {e}");
        }
    }

    #[test]
    fn a_symlink_in_the_destination_is_never_followed() {
        let outside = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        // Planted before the copy (by an agent, say): dst/a -> outside.
        symlink(outside.path(), dst.path().join("a")).unwrap();
        let stream = tar_of(|b| {
            let data = b"pwned";
            let mut h = header(tar::EntryType::Regular, data.len() as u64);
            b.append_data(&mut h, "a/file", &data[..]).unwrap();
        });
        let e = unpack(&stream[..], dst.path(), &UnpackOptions::default()).unwrap_err();
        assert!(e.to_string().contains("symlink"), "{e}");
        assert!(!outside.path().join("file").exists());

        // A regular file over an existing symlink replaces the link.
        symlink(outside.path().join("target"), dst.path().join("f")).unwrap();
        let stream = tar_of(|b| {
            let mut h = header(tar::EntryType::Regular, 2);
            b.append_data(&mut h, "f", &b"ok"[..]).unwrap();
        });
        unpack(&stream[..], dst.path(), &UnpackOptions::default()).unwrap();
        assert!(!outside.path().join("target").exists());
        assert_eq!(std::fs::read(dst.path().join("f")).unwrap(), b"ok");
    }

    #[test]
    fn devices_are_skipped_and_setid_bits_can_be_stripped() {
        let stream = tar_of(|b| {
            let mut h = header(tar::EntryType::Char, 0);
            h.set_device_major(1).unwrap();
            h.set_device_minor(3).unwrap();
            b.append_data(&mut h, "null", io::empty()).unwrap();
            let mut h = header(tar::EntryType::Regular, 1);
            h.set_mode(0o4755);
            b.append_data(&mut h, "suid", &b"x"[..]).unwrap();
        });
        let dst = tempfile::tempdir().unwrap();
        let opts = UnpackOptions {
            strip_setid: true,
            ..UnpackOptions::default()
        };
        let stats = unpack(&stream[..], dst.path(), &opts).unwrap();
        assert_eq!((stats.entries, stats.skipped), (1, 1));
        assert!(!dst.path().join("null").exists());
        let mode = std::fs::metadata(dst.path().join("suid")).unwrap().mode() & 0o7777;
        assert_eq!(mode, 0o755);
    }

    #[test]
    fn hard_links_resolve_to_earlier_entries_only() {
        let stream = tar_of(|b| {
            let mut h = header(tar::EntryType::Regular, 1);
            b.append_data(&mut h, "top/a", &b"x"[..]).unwrap();
            let mut h = header(tar::EntryType::Link, 0);
            b.append_link(&mut h, "top/b", "top/a").unwrap();
        });
        let dst = tempfile::tempdir().unwrap();
        let opts = UnpackOptions {
            rename_top: Some("new".into()),
            ..UnpackOptions::default()
        };
        unpack(&stream[..], dst.path(), &opts).unwrap();
        let a = std::fs::metadata(dst.path().join("new/a")).unwrap();
        let b = std::fs::metadata(dst.path().join("new/b")).unwrap();
        assert_eq!(a.ino(), b.ino());
    }

    #[test]
    fn chunk_reader_and_writer_carry_a_stream() {
        let (tx, rx) = std::sync::mpsc::channel();
        let mut w = ChunkWriter::new(4, |b| {
            tx.send(b).map_err(|_| io::ErrorKind::BrokenPipe.into())
        });
        w.write_all(b"hello world").unwrap();
        w.flush().unwrap();
        drop(w);
        drop(tx);
        let mut consumed = 0;
        let mut r = ChunkReader::new(rx, |n| consumed += n);
        let mut s = String::new();
        r.read_to_string(&mut s).unwrap();
        drop(r);
        assert_eq!(s, "hello world");
        assert_eq!(consumed, 11);
    }
}
