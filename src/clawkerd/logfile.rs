//! clawkerd's log file, bounded in size.
//!
//! Anything on the network can make clawkerd log (a refused handshake is a
//! line), and the container's disk is the agent's workspace. So the file
//! rotates: once it would grow past `max_bytes` it is renamed to
//! `<name>.1` (replacing the previous one) and a fresh file is started.
//! At most `2 × max_bytes` (plus one line) is ever on disk. If the rename
//! fails, the file is truncated instead: the bound wins over history.
//! Rejection lines are also rate-limited ([`crate::log_limit`]), so in a
//! flood the file grows by about one line per rejection kind a second.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

/// Default size of one log file before it rotates.
pub const DEFAULT_MAX_BYTES: u64 = 8 << 20;

/// An append-only file that rotates at `max_bytes`.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    rotated: PathBuf,
    max_bytes: u64,
    file: File,
    written: u64,
}

impl RotatingFile {
    /// Opens (creating) `path` for appending; its current size counts.
    pub fn open(path: &Path, max_bytes: u64) -> std::io::Result<Self> {
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let written = file.metadata()?.len();
        let mut rotated = path.as_os_str().to_owned();
        rotated.push(".1");
        Ok(Self {
            path: path.to_owned(),
            rotated: rotated.into(),
            max_bytes: max_bytes.max(1),
            file,
            written,
        })
    }

    fn rotate(&mut self) -> std::io::Result<()> {
        match std::fs::rename(&self.path, &self.rotated) {
            Ok(()) => {
                self.file = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&self.path)?;
            }
            Err(_) => self.file.set_len(0)?,
        }
        self.written = 0;
        Ok(())
    }
}

impl Write for RotatingFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.written > 0 && self.written + buf.len() as u64 > self.max_bytes {
            self.rotate()?;
        }
        let n = self.file.write(buf)?;
        self.written += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.file.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn size(p: &Path) -> u64 {
        std::fs::metadata(p).map(|m| m.len()).unwrap_or(0)
    }

    #[test]
    fn the_file_rotates_and_total_size_stays_bounded() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("clawkerd.log");
        let mut f = RotatingFile::open(&path, 1000).unwrap();
        let line = [b'x'; 99];
        for _ in 0..10_000 {
            f.write_all(&line).unwrap();
            f.write_all(b"\n").unwrap();
        }
        let rotated = dir.path().join("clawkerd.log.1");
        assert!(size(&path) <= 1000, "{}", size(&path));
        assert!(size(&rotated) <= 1000, "{}", size(&rotated));
        assert!(size(&rotated) > 0);
        // Lines are never split across the two files.
        let text = std::fs::read_to_string(&rotated).unwrap();
        assert!(text.lines().all(|l| l.len() == 99), "{text}");
    }

    #[test]
    fn an_existing_file_counts_towards_the_bound() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.log");
        std::fs::write(&path, vec![b'y'; 900]).unwrap();
        let mut f = RotatingFile::open(&path, 1000).unwrap();
        f.write_all(&[b'z'; 200]).unwrap();
        assert_eq!(size(&path), 200);
        assert_eq!(size(&dir.path().join("c.log.1")), 900);
    }
}
