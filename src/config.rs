//! Configuration shared by the CLI and the daemons.

use std::path::PathBuf;

/// Where clawker keeps its state (auth material, the registry file):
/// `$CLAWKER_STATE_DIR` > `$XDG_DATA_HOME/clawker` > `~/.local/share/clawker`.
/// Empty variables count as unset.
pub fn default_state_dir() -> PathBuf {
    let var = |k: &str| std::env::var_os(k).filter(|v| !v.is_empty());
    if let Some(d) = var("CLAWKER_STATE_DIR") {
        return PathBuf::from(d);
    }
    if let Some(d) = var("XDG_DATA_HOME") {
        return PathBuf::from(d).join("clawker");
    }
    let home = var("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".local/share/clawker")
}
