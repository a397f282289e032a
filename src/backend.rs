//! Per-app runtime state shared by all workers: one generation of an app's settings, its
//! targets, and handles on their counters (defined and written in `stats.rs`) and health state
//! (`health.rs`). On reload, the counters and health of apps and targets whose names stay are
//! retained ([`Retained`]), so counters never go backwards and health is kept. Holds no
//! counters of its own and never touches sockets.

use std::collections::HashMap;
use std::sync::Arc;

use crate::acl::Acl;
use crate::config::{AppConfig, Balance, TargetConfig};
use crate::health::TargetHealth;
use crate::source_limit::SourceTable;
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

/// One route of an app: route 0 is the default (`cfg.targets`), then the SNI routes in
/// config order. `members[i]` indexes `AppRuntime::targets`, with weight `weights[i]`.
pub struct RouteRuntime {
    /// Lower-case server names and `*.` wildcards; empty for the default route.
    pub sni: Vec<String>,
    pub members: Vec<usize>,
    pub weights: Vec<u32>,
    pub balance: Balance,
}

pub struct AppRuntime {
    pub cfg: AppConfig,
    pub counters: Arc<AppCounters>,
    /// Every target of the app (default route first, each name once): health checks, metrics
    /// and `Pair::target` index this.
    pub targets: Vec<TargetRuntime>,
    /// Never empty: `routes[0]` is the default route.
    pub routes: Vec<RouteRuntime>,
    /// `None` when neither `allow` nor `deny` is set.
    pub acl: Option<Acl>,
    /// Live pairs per source, when `max_conns_per_source` is set (retained across reloads).
    pub sources: Option<Arc<SourceTable>>,
}

/// Counters and health retained from one generation of apps to the next, keyed by names.
#[derive(Default)]
pub struct Retained {
    apps: HashMap<String, Arc<AppCounters>>,
    targets: HashMap<(String, String), (Arc<TargetCounters>, Arc<TargetHealth>)>,
    sources: HashMap<String, Arc<SourceTable>>,
}

impl Retained {
    pub fn from_apps(apps: &[Arc<AppRuntime>]) -> Retained {
        let mut c = Retained::default();
        for a in apps {
            c.apps.insert(a.cfg.name.clone(), a.counters.clone());
            if let Some(t) = &a.sources {
                c.sources.insert(a.cfg.name.clone(), t.clone());
            }
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
    /// Build the runtime of `cfg`, reusing retained state for names seen before. `max_conns`
    /// (the global limit) sizes the per-source table.
    pub fn new(cfg: AppConfig, workers: usize, max_conns: usize, carry: &Retained) -> AppRuntime {
        let counters = carry
            .apps
            .get(&cfg.name)
            .filter(|c| c.bytes.len() == workers.max(1) + 1)
            .cloned()
            .unwrap_or_else(|| Arc::new(AppCounters::new(workers)));
        let targets: Vec<TargetRuntime> = cfg
            .all_targets()
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
        let index = |name: &str| targets.iter().position(|t| t.cfg.name == name).unwrap_or(0);
        let mut routes = vec![RouteRuntime {
            sni: Vec::new(),
            members: (0..cfg.targets.len()).collect(),
            weights: cfg.targets.iter().map(|t| t.weight).collect(),
            balance: cfg.balance,
        }];
        for r in &cfg.routes {
            routes.push(RouteRuntime {
                sni: r.sni.clone(),
                members: r.targets.iter().map(|t| index(&t.name)).collect(),
                weights: r.targets.iter().map(|t| t.weight).collect(),
                balance: r.balance,
            });
        }
        let acl = (!cfg.allow.is_empty() || !cfg.deny.is_empty())
            .then(|| Acl::new(&cfg.allow, &cfg.deny));
        let sources = cfg.max_conns_per_source.map(|_| {
            carry
                .sources
                .get(&cfg.name)
                .cloned()
                .unwrap_or_else(|| Arc::new(SourceTable::new(max_conns)))
        });
        AppRuntime {
            cfg,
            counters,
            targets,
            routes,
            acl,
            sources,
        }
    }

    /// The route for server name `name` (lower case): an exact pattern first, then the
    /// longest matching `*.` wildcard (which matches one or more labels); else the default.
    pub fn route_for(&self, name: Option<&str>) -> usize {
        let Some(name) = name else {
            return 0;
        };
        let mut best: Option<(usize, usize)> = None;
        for (i, r) in self.routes.iter().enumerate().skip(1) {
            for p in &r.sni {
                if p == name {
                    return i;
                }
                if let Some(suffix) = p.strip_prefix('*')
                    && name.len() > suffix.len()
                    && name.ends_with(suffix)
                    && best.is_none_or(|(len, _)| suffix.len() > len)
                {
                    best = Some((suffix.len(), i));
                }
            }
        }
        best.map_or(0, |(_, i)| i)
    }

    /// Whether routing needs the client's ClientHello.
    pub fn routes_by_sni(&self) -> bool {
        self.routes.len() > 1
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
