//! The tail of the audit log, for `clawker events` without `--follow`.
//!
//! The audit actor appends one JSON object per line to
//! `<state>/audit/events.jsonl`: `{"name": …, "at": <RFC 3339>, "event": {…}}`.
//! The file can be large, so it is read backwards in blocks until enough
//! matching lines are found. Lines that are not such objects (a torn last
//! line after a crash, say) are skipped and counted, never fatal.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use serde::Deserialize;

const BLOCK: u64 = 64 * 1024;

/// One audit log line.
#[derive(Debug, Clone, PartialEq, Deserialize, serde::Serialize)]
pub struct AuditRecord {
    pub name: String,
    /// RFC 3339, as written by the audit actor.
    pub at: String,
    #[serde(default)]
    pub event: serde_json::Value,
}

/// `<state>/audit/events.jsonl`.
pub fn audit_log_path(state_dir: &Path) -> PathBuf {
    state_dir.join("audit").join("events.jsonl")
}

/// The last `n` records whose name starts with one of `prefixes` (all when
/// empty), oldest first, and how many malformed lines were skipped on the
/// way.
pub fn tail(
    path: &Path,
    n: usize,
    prefixes: &[String],
) -> std::io::Result<(Vec<AuditRecord>, usize)> {
    let mut f = File::open(path)?;
    let mut pos = f.seek(SeekFrom::End(0))?;
    let mut found = Vec::new();
    let mut skipped = 0;
    // Bytes of the (possibly incomplete) line at the front of what we read.
    let mut carry: Vec<u8> = Vec::new();
    let wanted = |r: &AuditRecord| {
        prefixes.is_empty() || prefixes.iter().any(|p| r.name.starts_with(p.as_str()))
    };
    let mut take_line = |line: &[u8], found: &mut Vec<AuditRecord>| {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.iter().all(u8::is_ascii_whitespace) {
            return;
        }
        match serde_json::from_slice::<AuditRecord>(line) {
            Ok(r) if wanted(&r) => found.push(r),
            Ok(_) => {}
            Err(_) => skipped += 1,
        }
    };
    while found.len() < n && pos > 0 {
        let start = pos.saturating_sub(BLOCK);
        let mut block = vec![0u8; (pos - start) as usize];
        f.seek(SeekFrom::Start(start))?;
        f.read_exact(&mut block)?;
        pos = start;
        block.extend_from_slice(&carry);
        // Everything after the first newline is complete lines.
        let split = match block.iter().position(|&b| b == b'\n') {
            Some(i) => i,
            None => {
                carry = block;
                continue;
            }
        };
        carry = block[..split].to_vec();
        for line in block[split + 1..].rsplit(|&b| b == b'\n') {
            if found.len() >= n {
                break;
            }
            take_line(line, &mut found);
        }
    }
    if pos == 0 && found.len() < n {
        take_line(&carry, &mut found);
    }
    found.truncate(n);
    found.reverse();
    Ok((found, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn line(i: usize, name: &str) -> String {
        format!(
            "{{\"name\":\"{name}\",\"at\":\"2024-01-01T00:00:{:02}Z\",\"event\":{{\"i\":{i}}}}}\n",
            i % 60
        )
    }

    #[test]
    fn tail_returns_the_last_matching_records_oldest_first() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("events.jsonl");
        let mut f = File::create(&p).unwrap();
        // Enough lines to span several blocks, plus junk and a torn tail.
        for i in 0..5000 {
            let name = if i % 2 == 0 {
                "agent.session.connected"
            } else {
                "docker.event"
            };
            f.write_all(line(i, name).as_bytes()).unwrap();
            if i == 4990 {
                f.write_all(b"not json\n\n").unwrap();
            }
        }
        f.write_all(b"{\"name\":\"torn").unwrap();
        drop(f);

        let (all, skipped) = tail(&p, 3, &[]).unwrap();
        let is: Vec<_> = all.iter().map(|r| r.event["i"].as_u64().unwrap()).collect();
        assert_eq!(is, [4997, 4998, 4999]);
        assert_eq!(skipped, 1, "the torn last line");

        let (sess, skipped) = tail(&p, 10, &["agent.session.".to_owned()]).unwrap();
        assert_eq!(sess.len(), 10);
        assert_eq!(sess.last().unwrap().event["i"], 4998);
        assert_eq!(sess.first().unwrap().event["i"], 4980);
        assert_eq!(skipped, 2, "torn line and `not json`");

        let (every, _) = tail(&p, 100_000, &[]).unwrap();
        assert_eq!(every.len(), 5000);
        assert_eq!(every[0].event["i"], 0);
        assert!(tail(&dir.path().join("missing"), 1, &[]).is_err());
    }
}
