//! `CLAWKER_USER` resolution by parsing `/etc/passwd` and `/etc/group`
//! ourselves (reference §7.4).
//!
//! Why not `getpwnam`: clawkerd is a static binary in a `FROM scratch`
//! image, where glibc's NSS does not work. Semantics follow Docker/runc's
//! `user` field: `name`, `name:group`, `uid`, `uid:gid`.

use std::path::Path;

/// A resolved user the user command runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResolvedUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups; empty when the spec named a group explicitly.
    pub groups: Vec<u32>,
    pub home: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("clawkerd: empty user spec")]
    EmptySpec,
    #[error("clawkerd: read passwd {path:?}: {err}")]
    Passwd { path: String, err: String },
    #[error("clawkerd: open group {path:?}: {err}")]
    Group { path: String, err: String },
    #[error(
        "clawkerd: resolve user {spec:?}: unable to find user {user}: no matching entries in passwd file"
    )]
    NoUser { spec: String, user: String },
    #[error(
        "clawkerd: resolve user {spec:?}: unable to find group {group}: no matching entries in group file"
    )]
    NoGroup { spec: String, group: String },
}

struct PasswdRow {
    name: String,
    uid: u32,
    gid: u32,
    home: String,
}

struct GroupRow {
    name: String,
    gid: u32,
    members: Vec<String>,
}

fn parse_passwd(text: &str) -> Vec<PasswdRow> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(PasswdRow {
                name: f.first()?.to_string(),
                uid: f.get(2)?.parse().ok()?,
                gid: f.get(3)?.parse().ok()?,
                home: f.get(5).map(|s| s.to_string()).unwrap_or_default(),
            })
        })
        .collect()
}

fn parse_group(text: &str) -> Vec<GroupRow> {
    text.lines()
        .filter(|l| !l.trim().is_empty() && !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split(':').collect();
            Some(GroupRow {
                name: f.first()?.to_string(),
                gid: f.get(2)?.parse().ok()?,
                members: f
                    .get(3)
                    .map(|m| {
                        m.split(',')
                            .map(str::trim)
                            .filter(|s| !s.is_empty())
                            .map(str::to_owned)
                            .collect()
                    })
                    .unwrap_or_default(),
            })
        })
        .collect()
}

/// Resolves `spec` against the given passwd and group files.
pub fn resolve(spec: &str, passwd: &Path, group: &Path) -> Result<ResolvedUser, UserError> {
    if spec.is_empty() {
        return Err(UserError::EmptySpec);
    }
    let passwd_text = std::fs::read_to_string(passwd).map_err(|e| UserError::Passwd {
        path: passwd.display().to_string(),
        err: e.to_string(),
    })?;
    let group_text = std::fs::read_to_string(group).map_err(|e| UserError::Group {
        path: group.display().to_string(),
        err: e.to_string(),
    })?;
    resolve_in(spec, &passwd_text, &group_text)
}

/// Pure core of [`resolve`], on file contents.
pub fn resolve_in(spec: &str, passwd: &str, group: &str) -> Result<ResolvedUser, UserError> {
    if spec.is_empty() {
        return Err(UserError::EmptySpec);
    }
    let users = parse_passwd(passwd);
    let groups = parse_group(group);
    let (user_part, group_part) = match spec.split_once(':') {
        Some((u, g)) => (u, Some(g)),
        None => (spec, None),
    };
    let no_user = || UserError::NoUser {
        spec: spec.to_owned(),
        user: user_part.to_owned(),
    };
    let row = match user_part.parse::<u32>() {
        Ok(uid) => users.iter().find(|r| r.uid == uid),
        Err(_) => users.iter().find(|r| r.name == user_part),
    }
    .ok_or_else(no_user)?;

    let (gid, supplementary) = match group_part.filter(|g| !g.is_empty()) {
        Some(g) => {
            let gid = match g.parse::<u32>() {
                Ok(n) => n,
                Err(_) => groups
                    .iter()
                    .find(|r| r.name == g)
                    .map(|r| r.gid)
                    .ok_or_else(|| UserError::NoGroup {
                        spec: spec.to_owned(),
                        group: g.to_owned(),
                    })?,
            };
            (gid, Vec::new())
        }
        None => {
            let supp = groups
                .iter()
                .filter(|r| r.members.contains(&row.name))
                .map(|r| r.gid)
                .collect();
            (row.gid, supp)
        }
    };
    Ok(ResolvedUser {
        name: row.name.clone(),
        uid: row.uid,
        gid,
        groups: supplementary,
        home: if row.home.is_empty() {
            "/".into()
        } else {
            row.home.clone()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PASSWD: &str =
        "root:x:0:0:root:/root:/bin/sh\nclaude:x:1000:1000::/home/claude:/bin/sh\n";
    const GROUP: &str = "root:x:0:\nclaude:x:1000:\nwheel:x:10:claude\n";

    #[test]
    fn resolves_the_reference_table() {
        let u = resolve_in("claude", PASSWD, GROUP).unwrap();
        assert_eq!(
            (u.uid, u.gid, u.home.as_str()),
            (1000, 1000, "/home/claude")
        );
        assert_eq!(u.groups, vec![10]);
        assert_eq!(resolve_in("claude:wheel", PASSWD, GROUP).unwrap().gid, 10);
        let u = resolve_in("1000", PASSWD, GROUP).unwrap();
        assert_eq!((u.uid, u.gid, u.name.as_str()), (1000, 1000, "claude"));
        let u = resolve_in("1000:10", PASSWD, GROUP).unwrap();
        assert_eq!((u.gid, u.groups.len()), (10, 0));
    }

    #[test]
    fn errors_are_clear() {
        assert_eq!(resolve_in("", PASSWD, GROUP), Err(UserError::EmptySpec));
        let e = resolve_in("nobody", PASSWD, GROUP).unwrap_err();
        assert!(e.to_string().contains("nobody"), "{e}");
        let e = resolve(
            "claude",
            Path::new("/nonexistent/passwd"),
            Path::new("/etc/group"),
        )
        .unwrap_err();
        assert!(e.to_string().contains("passwd"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("passwd");
        std::fs::write(&p, PASSWD).unwrap();
        let e = resolve("claude", &p, Path::new("/nonexistent/group")).unwrap_err();
        assert!(e.to_string().contains("group"), "{e}");
    }

    #[test]
    fn garbage_lines_are_skipped_not_fatal() {
        let passwd = format!("::::\nbad:x:notanumber:0::/:\n{PASSWD}");
        assert_eq!(resolve_in("claude", &passwd, "").unwrap().uid, 1000);
    }
}
