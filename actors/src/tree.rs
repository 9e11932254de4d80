//! Supervision-tree snapshot: serialisable (serde) and renderable as an
//! indented text tree, returned by
//! [`SupervisorHandle::tree`](crate::SupervisorHandle::tree).

use std::fmt::Write as _;

use serde::Serialize;

use crate::link::ExitReason;
use crate::supervisor::{Restart, Strategy};

/// Lifecycle state of a node.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ChildState {
    /// Start function running.
    Starting,
    /// Running.
    Running,
    /// Exited, waiting for its backoff before restarting.
    Restarting,
    /// Exited normally (or stopped by the supervisor) and not restarted.
    Stopped,
    /// Exited abnormally and not restarted.
    Failed,
}

impl std::fmt::Display for ChildState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            ChildState::Starting => "starting",
            ChildState::Running => "running",
            ChildState::Restarting => "restarting",
            ChildState::Stopped => "stopped",
            ChildState::Failed => "failed",
        })
    }
}

/// What a node is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum NodeKind {
    /// A supervisor with its strategy.
    Supervisor {
        /// Restart strategy.
        strategy: Strategy,
    },
    /// A worker actor.
    Worker,
}

/// One node of the supervision tree.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TreeNode {
    /// Spec name.
    pub name: String,
    /// Key of a dynamic child.
    pub key: Option<String>,
    /// Supervisor or worker.
    pub kind: NodeKind,
    /// Restart type (`None` for the root).
    pub restart: Option<Restart>,
    /// Current state.
    pub state: ChildState,
    /// Restarts so far.
    pub restarts: u32,
    /// Time since the current incarnation started, if running.
    pub uptime_ms: Option<u64>,
    /// Last exit reason, if it ever exited.
    pub last_exit: Option<ExitReason>,
    /// Children, in start order (static first, then dynamic).
    pub children: Vec<TreeNode>,
}

impl TreeNode {
    /// Render as an indented text tree.
    pub fn render(&self) -> String {
        let mut out = String::new();
        self.line(&mut out);
        self.render_children(&mut out, "");
        out
    }

    fn line(&self, out: &mut String) {
        let _ = write!(out, "{}", self.name);
        if let Some(k) = &self.key {
            let _ = write!(out, "[{k}]");
        }
        match self.kind {
            NodeKind::Supervisor { strategy } => {
                let _ = write!(out, " (supervisor {strategy}");
            }
            NodeKind::Worker => out.push_str(" (worker"),
        }
        if let Some(r) = self.restart {
            let _ = write!(out, ", {r}");
        }
        let _ = write!(out, ") {} restarts={}", self.state, self.restarts);
        if let Some(ms) = self.uptime_ms {
            let _ = write!(out, " up={:.3}s", ms as f64 / 1000.0);
        }
        if let Some(e) = &self.last_exit {
            let _ = write!(out, " last_exit=\"{e}\"");
        }
        out.push('\n');
    }

    fn render_children(&self, out: &mut String, prefix: &str) {
        let n = self.children.len();
        for (i, c) in self.children.iter().enumerate() {
            let last = i + 1 == n;
            out.push_str(prefix);
            out.push_str(if last { "└── " } else { "├── " });
            c.line(out);
            let next = format!("{prefix}{}", if last { "    " } else { "│   " });
            c.render_children(out, &next);
        }
    }

    /// Depth-first search by name or key.
    pub fn find(&self, name_or_key: &str) -> Option<&TreeNode> {
        if self.name == name_or_key || self.key.as_deref() == Some(name_or_key) {
            return Some(self);
        }
        self.children.iter().find_map(|c| c.find(name_or_key))
    }
}
