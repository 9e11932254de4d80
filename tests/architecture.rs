//! The dependency direction between the folders of `src/`, written down as
//! data and checked against the code (ARCHITECTURE.md, "Layers"). A new
//! `crate::x` path that breaks the direction fails this test, with the file
//! and the path to fix.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Each top-level module and the modules it may name. Everything not listed
/// for a module is forbidden to it. Read bottom-up: foundation, domain,
/// the runtime seam, services, the Docker edge, wiring.
const ALLOWED: &[(&str, &[&str])] = &[
    // Foundation: pure data and plumbing, no I/O of the CP's own.
    ("defaults", &[]),
    ("config", &[]),
    ("identity", &["defaults"]),
    ("proto", &[]),
    ("pki", &["identity", "defaults"]),
    ("tls", &["identity", "pki"]),
    // Bounds against hostile peers: the one truncation of peer strings,
    // rate-limited logging, and what every listener enforces.
    ("peer_text", &[]),
    ("log_limit", &[]),
    ("listen", &["log_limit", "peer_text"]),
    ("archive", &[]),
    // Domain: events (and the worldview), the registry, the runtime seam.
    ("events", &["identity", "defaults"]),
    ("registry", &["identity"]),
    ("runtime", &["defaults", "events"]),
    // The agent daemon: foundation only, never the CP.
    (
        "clawkerd",
        &[
            "archive",
            "identity",
            "pki",
            "proto",
            "tls",
            "defaults",
            "listen",
            "log_limit",
            "peer_text",
        ],
    ),
    // Services, written against the seams.
    (
        "session",
        &[
            "defaults",
            "events",
            "identity",
            "peer_text",
            "pki",
            "proto",
            "registry",
            "runtime",
            "tls",
        ],
    ),
    (
        "agent_api",
        &[
            "defaults",
            "identity",
            "listen",
            "log_limit",
            "peer_text",
            "pki",
            "proto",
            "registry",
            "runtime",
            "tls",
        ],
    ),
    // The admin API fronts the operator's containment actions (release,
    // unlock), so it may name the policy service.
    (
        "admin_api",
        &[
            "defaults", "events", "identity", "listen", "pki", "policy", "proto", "registry",
            "session", "tls",
        ],
    ),
    (
        "policy",
        &[
            "defaults", "events", "identity", "listen", "proto", "registry", "runtime", "session",
        ],
    ),
    // The fuzz targets' bodies (feature `fuzzing`, never shipped).
    (
        "fuzz_harness",
        &[
            "agent_api",
            "clawkerd",
            "cp",
            "defaults",
            "docker",
            "events",
            "identity",
            "peer_text",
            "pki",
            "proto",
            "registry",
            "session",
            "tls",
        ],
    ),
    // The kernel edge: rules in network namespaces and on the host. It
    // knows no container runtime (it takes pids, addresses, bridge names).
    ("netns", &[]),
    // The Docker edge implements the runtime seam (with the kernel edge for
    // what a container's namespace needs); nothing below names either.
    (
        "docker",
        &["defaults", "events", "runtime", "identity", "netns"],
    ),
    // Wiring: the one place the parts meet.
    (
        "cp",
        &[
            "admin_api",
            "agent_api",
            "config",
            "defaults",
            "docker",
            "events",
            "identity",
            "listen",
            "netns",
            "pki",
            "policy",
            "proto",
            "registry",
            "runtime",
            "session",
            "tls",
        ],
    ),
    (
        "cli",
        &[
            "admin_api",
            "agent_api",
            "archive",
            "config",
            "cp",
            "defaults",
            "docker",
            "events",
            "identity",
            "netns",
            "pki",
            "policy",
            "proto",
            "registry",
            "runtime",
            "session",
            "tls",
        ],
    ),
];

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).unwrap() {
        let p = entry.unwrap().path();
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// `src/<module>/…` or `src/<module>.rs` → module.
fn module_of(src: &Path, file: &Path) -> Option<String> {
    let rel = file.strip_prefix(src).ok()?;
    let first = rel.components().next()?.as_os_str().to_str()?;
    let name = first.strip_suffix(".rs").unwrap_or(first);
    (name != "lib" && name != "bin").then(|| name.to_owned())
}

/// Every `crate::<name>` in `text`.
fn crate_paths(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = text;
    while let Some(i) = rest.find("crate::") {
        let after = &rest[i + "crate::".len()..];
        let name: String = after
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        // `clawker_actors::…` ends in `crate::`? No: require a word boundary.
        let before = rest[..i].chars().last();
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_') && !name.is_empty() {
            out.push(name);
        }
        rest = after;
    }
    out
}

#[test]
fn every_module_imports_only_what_its_layer_allows() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let allowed: BTreeMap<&str, &[&str]> = ALLOWED.iter().copied().collect();
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let mut violations = Vec::new();
    let mut unknown = Vec::new();
    for f in &files {
        let Some(module) = module_of(&src, f) else {
            continue;
        };
        let Some(may) = allowed.get(module.as_str()) else {
            unknown.push(module.clone());
            continue;
        };
        let text = std::fs::read_to_string(f).unwrap();
        for dep in crate_paths(&text) {
            if dep != module && !may.contains(&dep.as_str()) {
                violations.push(format!(
                    "{}: names crate::{dep}, which `{module}` may not depend on",
                    f.strip_prefix(root).unwrap().display()
                ));
            }
        }
    }
    unknown.sort();
    unknown.dedup();
    assert!(
        unknown.is_empty(),
        "modules missing from ALLOWED in tests/architecture.rs: {unknown:?}"
    );
    violations.sort();
    violations.dedup();
    assert!(
        violations.is_empty(),
        "dependency direction broken (see ARCHITECTURE.md, Layers):\n{}",
        violations.join("\n")
    );
}

#[test]
fn only_the_docker_edge_imports_bollard() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let src = root.join("src");
    let mut files = Vec::new();
    rust_files(&src, &mut files);
    let offenders: Vec<String> = files
        .iter()
        .filter(|f| module_of(&src, f).as_deref() != Some("docker"))
        .filter(|f| std::fs::read_to_string(f).unwrap().contains("bollard::"))
        .map(|f| f.strip_prefix(root).unwrap().display().to_string())
        .collect();
    assert!(
        offenders.is_empty(),
        "bollard outside src/docker/: {offenders:?}"
    );
}

#[test]
fn the_actor_crate_knows_nothing_of_clawker() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("actors");
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .unwrap_or("")
        .split("\n[")
        .next()
        .unwrap_or("");
    assert!(
        !deps.lines().any(|l| l.trim_start().starts_with("clawker")),
        "clawker-actors depends on clawker: {deps}"
    );
    let mut files = Vec::new();
    rust_files(&root.join("src"), &mut files);
    for f in files {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            !text.contains("clawker::"),
            "{} names clawker::",
            f.display()
        );
    }
}

#[test]
fn the_checker_sees_paths_and_ignores_lookalikes() {
    assert_eq!(
        crate_paths("use crate::events::{self};\nlet x = crate::docker::Engine;"),
        vec!["events", "docker"]
    );
    assert!(crate_paths("clawker_actors::Backoff; mycrate::x").is_empty());
}
