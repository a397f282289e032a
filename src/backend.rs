//! Per-app runtime state shared by all workers: one generation of an app's settings, its
//! targets, and handles on their counters (defined and written in `stats.rs`) and health state
//! (`health.rs`). On reload, the counters and health of apps and targets whose names stay are
//! retained ([`Retained`]), so counters never go backwards and health is kept. Holds no
//! counters of its own and never touches sockets.

use std::collections::HashMap;
use std::sync::Arc;

use crate::config::{AppConfig, TargetConfig};
use crate::health::TargetHealth;
use crate::stats::{AppCounters, TargetCounters};

pub struct TargetRuntime {
    pub cfg: TargetConfig,
    pub counters: Arc<TargetCounters>,
    pub health: Arc<TargetHealth>,
}

impl TargetRuntime {
    pub fn active(&self) -> u32 {
        self.counters.active()
    }
}

pub struct AppRuntime {
    pub cfg: AppConfig,
    pub counters: Arc<AppCounters>,
    pub targets: Vec<TargetRuntime>,
}

/// Counters and health retained from one generation of apps to the next, keyed by names.
#[derive(Default)]
pub struct Retained {
    apps: HashMap<String, Arc<AppCounters>>,
    targets: HashMap<(String, String), (Arc<TargetCounters>, Arc<TargetHealth>)>,
}

impl Retained {
    pub fn from_apps(apps: &[Arc<AppRuntime>]) -> Retained {
        let mut c = Retained::default();
        for a in apps {
            c.apps.insert(a.cfg.name.clone(), a.counters.clone());
            for t in &a.targets {
                c.targets.insert(
                    (a.cfg.name.clone(), t.cfg.name.clone()),
                    (t.counters.clone(), t.health.clone()),
                );
            }
        }
        c
    }
}

impl AppRuntime {
    /// Build the runtime of `cfg`, reusing retained state for names seen before.
    pub fn new(cfg: AppConfig, workers: usize, carry: &Retained) -> AppRuntime {
        let counters = carry
            .apps
            .get(&cfg.name)
            .filter(|c| c.bytes.len() == workers.max(1))
            .cloned()
            .unwrap_or_else(|| Arc::new(AppCounters::new(workers)));
        let targets = cfg
            .targets
            .iter()
            .map(|t| {
                let (counters, health) = carry
                    .targets
                    .get(&(cfg.name.clone(), t.name.clone()))
                    .cloned()
                    .unwrap_or_else(|| {
                        (
                            Arc::new(TargetCounters::default()),
                            Arc::new(TargetHealth::new()),
                        )
                    });
                TargetRuntime {
                    cfg: t.clone(),
                    counters,
                    health,
                }
            })
            .collect();
        AppRuntime {
            cfg,
            counters,
            targets,
        }
    }

    pub fn active(&self) -> usize {
        self.counters.active()
    }

    /// Far enough below the per-app limit to resume accepting (hysteresis).
    pub fn below_resume(&self) -> bool {
        self.cfg
            .max_conns
            .is_none_or(|m| self.active() <= resume_mark(m))
    }
}

/// Where accepting resumes after hitting `limit`: about 90% of it, and at least one below.
pub fn resume_mark(limit: usize) -> usize {
    limit.saturating_sub((limit / 10).max(1))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resume_mark_is_below_limit() {
        assert_eq!(resume_mark(10), 9);
        assert_eq!(resume_mark(1), 0);
        assert_eq!(resume_mark(10000), 9000);
    }
}
