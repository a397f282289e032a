//! The resolved configuration: what the runtime runs. Every value here is validated and has
//! its defaults applied; nothing downstream re-checks it. Parsing of the on-disk formats lives
//! in `file.rs` (TOML), `json.rs` and `pipe.rs`; precedence and validation in `resolve.rs`.
//! This module must never open sockets or read the clock.

pub mod file;
pub mod json;
pub mod pipe;
pub mod resolve;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

pub use resolve::{ConfigError, Overrides, load_file, parse_duration};

/// Load-balancing policy of an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Balance {
    #[default]
    RoundRobin,
    Random,
    LeastConn,
    SourceHash,
}

impl Balance {
    pub fn as_str(self) -> &'static str {
        match self {
            Balance::RoundRobin => "round-robin",
            Balance::Random => "random",
            Balance::LeastConn => "least-conn",
            Balance::SourceHash => "source-hash",
        }
    }
    pub fn parse(s: &str) -> Option<Balance> {
        match s {
            "round-robin" | "roundrobin" => Some(Balance::RoundRobin),
            "random" => Some(Balance::Random),
            "least-conn" | "leastconn" => Some(Balance::LeastConn),
            "source-hash" | "source" => Some(Balance::SourceHash),
            _ => None,
        }
    }
}

/// Number of worker threads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workers {
    Count(usize),
    Auto,
}

impl Default for Workers {
    fn default() -> Self {
        Workers::Count(1)
    }
}

/// One upstream target of an app.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetConfig {
    /// As the operator wrote it ("db1:5432", "[::1]:80"); used as the metrics label.
    pub name: String,
    /// Resolved at load time.
    pub addr: SocketAddr,
    /// Relative weight, always >= 1.
    pub weight: u32,
}

/// Active health checks (TCP connect probes).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ActiveHealth {
    pub interval: Duration,
    pub timeout: Duration,
    /// Good probes in a row to bring a down target back; >= 1.
    pub rise: u32,
    /// Failed probes in a row to mark a target down; >= 1.
    pub fall: u32,
}

/// Passive + active health settings of an app.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthConfig {
    /// Consecutive failed connects (passive) that mark a target down; >= 1.
    pub fall: u32,
    /// Without active checks, how long a passively-downed target is skipped.
    pub down_time: Duration,
    /// `None` = passive only.
    pub active: Option<ActiveHealth>,
}

impl Default for HealthConfig {
    fn default() -> Self {
        HealthConfig {
            fall: 3,
            down_time: Duration::from_secs(10),
            active: None,
        }
    }
}

/// One application: a set of listeners routed to a set of targets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppConfig {
    /// Unique among apps.
    pub name: String,
    /// Never empty; unique across all apps.
    pub listen: Vec<SocketAddr>,
    /// Never empty.
    pub targets: Vec<TargetConfig>,
    pub balance: Balance,
    /// Per-app limit of live pairs; `None` = only the global limit.
    pub max_conns: Option<usize>,
    pub connect_timeout: Duration,
    /// `None` = off.
    pub idle_timeout: Option<Duration>,
    /// Connect attempts after the first; `None` = every target once.
    pub retries: Option<usize>,
    pub health: HealthConfig,
    pub access_log: bool,
    pub splice: bool,
}

/// The whole process configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub workers: Workers,
    /// CPU list for worker pinning; empty = no pinning.
    pub cpu_pin: Vec<usize>,
    /// Global limit of live pairs (whole process). `None` = derive from fd/memory limits.
    pub max_conns: Option<usize>,
    pub buffer_size: usize,
    pub max_events: usize,
    pub backlog: i32,
    pub grace: Duration,
    pub drain_delay: Duration,
    /// `None` = off.
    pub log_interval: Option<Duration>,
    pub admin: Option<SocketAddr>,
    pub apps: Vec<AppConfig>,
    /// The file this came from (for reload and error messages); `None` for CLI-only.
    pub source: Option<PathBuf>,
}

pub const DEFAULT_MAX_CONNS: usize = 10_000;
pub const DEFAULT_BUFFER_SIZE: usize = 8192;
pub const DEFAULT_MAX_EVENTS: usize = 128;
pub const DEFAULT_BACKLOG: i32 = 1024;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_GRACE: Duration = Duration::from_secs(30);
pub const DEFAULT_LOG_INTERVAL: Duration = Duration::from_secs(10);

impl Default for Config {
    fn default() -> Self {
        Config {
            workers: Workers::default(),
            cpu_pin: Vec::new(),
            max_conns: None,
            buffer_size: DEFAULT_BUFFER_SIZE,
            max_events: DEFAULT_MAX_EVENTS,
            backlog: DEFAULT_BACKLOG,
            grace: DEFAULT_GRACE,
            drain_delay: Duration::ZERO,
            log_interval: Some(DEFAULT_LOG_INTERVAL),
            admin: None,
            apps: Vec::new(),
            source: None,
        }
    }
}

impl AppConfig {
    /// An app with built-in defaults for everything but its addresses.
    pub fn new(name: &str, listen: Vec<SocketAddr>, targets: Vec<TargetConfig>) -> AppConfig {
        AppConfig {
            name: name.to_string(),
            listen,
            targets,
            balance: Balance::default(),
            max_conns: None,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: None,
            retries: None,
            health: HealthConfig::default(),
            access_log: false,
            splice: false,
        }
    }
}

impl TargetConfig {
    pub fn new(addr: SocketAddr) -> TargetConfig {
        TargetConfig {
            name: addr.to_string(),
            addr,
            weight: 1,
        }
    }
}
