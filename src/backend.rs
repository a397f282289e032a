//! Per-app runtime state shared by all workers: the app's settings, its live-pair count (for
//! the per-app limit), and per target the live-pair count (least-conn) and health state. Written
//! only on accept, connect and close — never per byte relayed.

use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering::Relaxed};

use crate::config::{AppConfig, TargetConfig};
use crate::health::TargetHealth;

pub struct TargetRuntime {
    pub cfg: TargetConfig,
    /// Live pairs connected or connecting to this target, over all workers.
    pub active: AtomicU32,
    pub health: Arc<TargetHealth>,
}

pub struct AppRuntime {
    pub cfg: AppConfig,
    /// Live pairs of this app, over all workers.
    pub active: AtomicUsize,
    pub targets: Vec<TargetRuntime>,
}

impl AppRuntime {
    /// Build the runtime of `cfg`; `health_of` returns the health state to use for a target
    /// (so a reload can keep the state of unchanged targets).
    pub fn new(cfg: AppConfig, health_of: &mut dyn FnMut(&TargetConfig) -> Arc<TargetHealth>) -> AppRuntime {
        let targets = cfg
            .targets
            .iter()
            .map(|t| TargetRuntime {
                cfg: t.clone(),
                active: AtomicU32::new(0),
                health: health_of(t),
            })
            .collect();
        AppRuntime {
            cfg,
            active: AtomicUsize::new(0),
            targets,
        }
    }

    pub fn active(&self) -> usize {
        self.active.load(Relaxed)
    }

    /// At or over the per-app limit.
    pub fn at_limit(&self) -> bool {
        self.cfg.max_conns.is_some_and(|m| self.active() >= m)
    }

    /// Far enough below the per-app limit to resume accepting (hysteresis).
    pub fn below_resume(&self) -> bool {
        self.cfg.max_conns.is_none_or(|m| self.active() <= resume_mark(m))
    }
}

/// Where accepting resumes after hitting `limit`: about 90% of it, and at least one below.
pub fn resume_mark(limit: usize) -> usize {
    limit.saturating_sub((limit / 10).max(1))
}
