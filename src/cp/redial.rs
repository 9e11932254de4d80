//! The redial reconciler: every running agent container should have a
//! session.
//!
//! Sessions start on Docker events (`start`, `restart`, `unpause`) and at
//! boot. A session whose connect cycle runs out of budget ends with
//! `SessionFailed{connect_total_timeout}` and its actor goes away — and
//! before this reconciler nothing dialed that container again until Docker
//! said something about it, which for a healthy running container is
//! never (the issue that introduced it: an agent started during a
//! connection flood stayed without a session after the flood ended).
//!
//! So every `interval` (default 15 s) the reconciler lists running agent
//! containers (one label-filtered Docker list) and compares them with the
//! keys of the `sessions` supervisor ([`Sessions::active`]); each running
//! container without a session actor is dialed, at once the first time and
//! then with a per-container backoff ([`RedialPlan`]), so a container that
//! keeps failing costs one dial per backoff step, not one per tick. One
//! tick runs at a time; nothing polls faster than `interval`.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use clawker_actors::{Backoff, ChildLink, ChildSpec};

use crate::runtime::{Inventory, ListScope};
use crate::session::Sessions;

/// Upper bound of the per-container backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, Copy)]
struct Entry {
    attempts: u32,
    next_at: Instant,
    /// Last tick at which the container had no session.
    last_absent: Instant,
}

/// Which containers to dial at a tick. Pure, so the backoff is tested with
/// an injected clock.
#[derive(Debug)]
pub struct RedialPlan {
    backoff: Backoff,
    entries: HashMap<String, Entry>,
}

impl RedialPlan {
    /// Retries after the first at `initial`, ×2, … up to [`MAX_BACKOFF`].
    pub fn new(initial: Duration) -> Self {
        Self {
            backoff: Backoff::new(initial, MAX_BACKOFF.max(initial)),
            entries: HashMap::new(),
        }
    }

    /// The containers to dial now, given the running agent containers and
    /// those with a session actor.
    pub fn due(&mut self, running: &[String], active: &[String], now: Instant) -> Vec<String> {
        let running: HashSet<&str> = running.iter().map(String::as_str).collect();
        let active: HashSet<&str> = active.iter().map(String::as_str).collect();
        let forget_after = self.backoff.max;
        // A container that is gone, or has held a session for longer than
        // the longest backoff, starts afresh next time.
        self.entries.retain(|id, e| {
            running.contains(id.as_str())
                && !(active.contains(id.as_str())
                    && now.saturating_duration_since(e.last_absent) > forget_after)
        });
        let mut due = Vec::new();
        for id in running.iter().filter(|id| !active.contains(*id)) {
            match self.entries.get_mut(*id) {
                None => {
                    self.entries.insert(
                        (*id).to_owned(),
                        Entry {
                            attempts: 1,
                            next_at: now + self.backoff.ceiling(1),
                            last_absent: now,
                        },
                    );
                    due.push((*id).to_owned());
                }
                Some(e) => {
                    e.last_absent = now;
                    if now >= e.next_at {
                        e.attempts = e.attempts.saturating_add(1);
                        e.next_at = now + self.backoff.ceiling(e.attempts);
                        due.push((*id).to_owned());
                    }
                }
            }
        }
        due.sort();
        due
    }

    /// Containers the plan currently remembers.
    pub fn tracked(&self) -> usize {
        self.entries.len()
    }
}

/// The reconciler actor (`session-redial`, a child of the root).
pub struct Redial {
    inventory: Arc<dyn Inventory>,
    sessions: Sessions,
    interval: Duration,
    plan: RedialPlan,
    busy: bool,
}

impl Redial {
    pub fn spec(
        inventory: Arc<dyn Inventory>,
        sessions: Sessions,
        interval: Duration,
    ) -> ChildSpec {
        ChildSpec::worker("session-redial", move |link: ChildLink| {
            let (inventory, sessions) = (inventory.clone(), sessions.clone());
            Ok(Redial::create(move |ctx| {
                link.attach(ctx);
                Redial {
                    inventory,
                    sessions,
                    interval,
                    plan: RedialPlan::new(interval),
                    busy: false,
                }
            }))
        })
    }

    fn tick(&mut self, ctx: &mut Context<Self>) {
        if self.busy {
            return;
        }
        self.busy = true;
        let (inventory, sessions) = (self.inventory.clone(), self.sessions.clone());
        let look = async move {
            let running = inventory.list_agents(ListScope::Running).await;
            (running, sessions.active().await)
        };
        ctx.spawn(look.into_actor(self).map(|(running, active), act, _ctx| {
            act.busy = false;
            let running: Vec<String> = match running {
                // Paused containers are listed too; `unpause` dials them.
                Ok(list) => list
                    .into_iter()
                    .filter(|c| c.running)
                    .map(|c| c.id)
                    .collect(),
                Err(error) => {
                    tracing::warn!(event = "session_redial_list_failed", %error, "redial: listing agents failed");
                    return;
                }
            };
            let due = act.plan.due(&running, &active, Instant::now());
            if due.is_empty() {
                return;
            }
            let sessions = act.sessions.clone();
            actix::spawn(async move {
                for id in due {
                    tracing::info!(event = "session_redial", container_id = %id, "running agent without a session; dialing");
                    sessions.dial(&id).await;
                }
            });
        }));
    }
}

impl Actor for Redial {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Context<Self>) {
        ctx.run_interval(self.interval, |act, ctx| act.tick(ctx));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(v: &[&str]) -> Vec<String> {
        v.iter().map(|s| (*s).to_owned()).collect()
    }

    #[test]
    fn a_running_container_without_a_session_is_dialed_at_once() {
        let mut p = RedialPlan::new(Duration::from_secs(15));
        let t0 = Instant::now();
        let due = p.due(&ids(&["a", "b", "c"]), &ids(&["b"]), t0);
        assert_eq!(due, ids(&["a", "c"]));
        // Nothing running without a session: nothing to do.
        assert!(p.due(&ids(&["b"]), &ids(&["b"]), t0).is_empty());
        assert_eq!(p.tracked(), 0, "gone containers are forgotten");
    }

    #[test]
    fn a_container_that_keeps_failing_backs_off() {
        let mut p = RedialPlan::new(Duration::from_secs(15));
        let t0 = Instant::now();
        let run = ids(&["a"]);
        let mut dialed = Vec::new();
        // Ticks every 15 s for 20 minutes; the dial never sticks.
        for tick in 0..80u64 {
            let now = t0 + Duration::from_secs(15 * tick);
            if !p.due(&run, &[], now).is_empty() {
                dialed.push(15 * tick);
            }
        }
        // 0, 15, 45, 105, 225, 465 (capped at 300 s from here), 765, 1065.
        assert_eq!(dialed, vec![0, 15, 45, 105, 225, 465, 765, 1065]);
    }

    #[test]
    fn a_session_held_longer_than_the_longest_backoff_resets_the_count() {
        let mut p = RedialPlan::new(Duration::from_secs(15));
        let t0 = Instant::now();
        let run = ids(&["a"]);
        assert_eq!(p.due(&run, &[], t0).len(), 1);
        assert_eq!(p.due(&run, &[], t0 + Duration::from_secs(15)).len(), 1);
        // Connected for ten minutes...
        assert!(p.due(&run, &run, t0 + Duration::from_secs(600)).is_empty());
        assert_eq!(p.tracked(), 0);
        // ...then lost again: dialed at once, as a first failure.
        assert_eq!(p.due(&run, &[], t0 + Duration::from_secs(615)).len(), 1);
    }
}
