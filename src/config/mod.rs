//! The resolved configuration — what the runtime runs — and the one way to get it: every value
//! here is validated and has its defaults applied; nothing downstream re-checks it.
//!
//! Layout (dependencies point down; nothing points back up):
//! - `mod.rs` (this file): the resolved types and loading — [`load_file`], [`load_str`] and
//!   [`load_args`] pick a parser, then call `resolve` and `apply_overrides`.
//! - `file.rs` (TOML), `json.rs`, `pipe.rs` (the on-disk formats) and `args.rs` (the command
//!   line's `-l -p -b -P`): parsers, each turning its input into a [`RawDoc`].
//! - `resolve.rs`: a `RawDoc` into a [`Config`] — defaults, precedence, validation.
//! - `raw.rs` (the format-neutral raw document) and `error.rs` ([`ConfigError`]): plain data,
//!   used by all of the above.
//!
//! This module must never open sockets or read the clock.

pub mod args;
pub mod describe;
pub mod error;
pub mod file;
pub mod json;
pub mod pipe;
pub mod raw;
pub mod resolve;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use crate::acl::Cidr;

pub use args::AppArgs;
pub use describe::describe;
pub use error::ConfigError;
pub use raw::RawDoc;
pub use resolve::{MAX_CPU, MAX_WORKERS, Overrides, apply_overrides, parse_duration, resolve};

/// The on-disk format of a config file, chosen by its extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Toml,
    Json,
    Pipe,
}

impl Format {
    /// `.toml`, `.json` or `.conf` (case-insensitive); anything else is `None`.
    pub fn from_path(path: &Path) -> Option<Format> {
        let ext = path.extension()?.to_str()?.to_ascii_lowercase();
        match ext.as_str() {
            "toml" => Some(Format::Toml),
            "json" => Some(Format::Json),
            "conf" => Some(Format::Pipe),
            _ => None,
        }
    }
}

/// Load and validate a config file (format by extension), then apply CLI overrides.
/// `Config.source` is the path.
pub fn load_file(path: &Path, ov: &Overrides) -> Result<Config, ConfigError> {
    let file = path.display().to_string();
    let format = Format::from_path(path).ok_or_else(|| ConfigError {
        file: Some(file.clone()),
        line: None,
        app: None,
        key: None,
        message: "unknown config format: the file name must end in .toml, .json or .conf".into(),
    })?;
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
        file: Some(file.clone()),
        line: None,
        app: None,
        key: None,
        message: format!("cannot read config file: {e}"),
    })?;
    let mut cfg = load_text(&text, format, ov).map_err(|mut e| {
        e.file = Some(file.clone());
        e
    })?;
    cfg.source = Some(PathBuf::from(path));
    Ok(cfg)
}

/// Like [`load_file`] for text already in memory; `name` (a file name) picks the format by its
/// extension and is used in error messages. `Config.source` stays `None`.
pub fn load_str(text: &str, name: &str, ov: &Overrides) -> Result<Config, ConfigError> {
    let with_file = |mut e: ConfigError| {
        e.file = Some(name.to_string());
        e
    };
    let format = Format::from_path(Path::new(name)).ok_or_else(|| {
        with_file(ConfigError::new(
            None,
            None,
            None,
            "unknown config format: the file name must end in .toml, .json or .conf",
        ))
    })?;
    load_text(text, format, ov).map_err(with_file)
}

/// Parse `text` in `format`, resolve it and apply the overrides (errors carry no file name).
pub fn load_text(text: &str, format: Format, ov: &Overrides) -> Result<Config, ConfigError> {
    let raw = match format {
        Format::Toml => file::parse(text)?,
        Format::Json => json::parse(text)?,
        Format::Pipe => pipe::parse(text)?,
    };
    let mut cfg = resolve(raw)?;
    apply_overrides(&mut cfg, ov)?;
    Ok(cfg)
}

/// The configuration a command line without `--config` describes: one app named `default`
/// (see [`args`]), through the same `resolve` as a file, then the overrides. A host name for
/// `-l` is resolved first (as a target name would be: IPv4 preferred). Errors say they come
/// from the command line. `Config.source` is `None`.
pub fn load_args(app: &AppArgs, ov: &Overrides) -> Result<Config, ConfigError> {
    let from_cli = |mut e: ConfigError| {
        e.app = None;
        e.message.push_str(" (from the command line)");
        e
    };
    let mut app = app.clone();
    if args::ip_literal(&app.listen).is_none() {
        let addr = resolve::resolve_host(&app.listen, app.port)
            .map_err(|m| from_cli(ConfigError::new(None, None, Some("listen"), m)))?;
        app.listen = addr.ip().to_string();
    }
    let mut cfg = resolve(args::parse(&app)).map_err(from_cli)?;
    apply_overrides(&mut cfg, ov)?;
    Ok(cfg)
}

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
    /// As the operator wrote it (`db1:5432`, `[::1]:80`); used as the metrics label.
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
    /// `splice = true`: every direction relays through kernel pipes.
    pub splice: bool,
    /// `splice = "auto"` (the default): a direction moves to a kernel pipe while it is bulk
    /// (its buffer filled on consecutive reads) and back to its buffer when it turns quiet.
    pub splice_auto: bool,
    /// Write a PROXY protocol header toward the target before any client byte.
    pub send_proxy: Option<ProxyVersion>,
    /// Read a PROXY protocol (v1 or v2) header from the client before choosing a target.
    pub accept_proxy: bool,
    /// How long a client may take to send its PROXY header (and, with `routes`, its TLS
    /// ClientHello).
    pub proxy_header_timeout: Duration,
    /// Sources allowed (empty = all); `deny` wins over it.
    pub allow: Vec<Cidr>,
    pub deny: Vec<Cidr>,
    /// Concurrent pairs per client IP, over all workers; `None` = no limit.
    pub max_conns_per_source: Option<usize>,
    /// SNI routes, tried before the default route (`targets`, `balance`).
    pub routes: Vec<RouteConfig>,
    /// With `routes`: close clients whose first bytes are not a TLS ClientHello with SNI,
    /// instead of sending them to the default route.
    pub sni_required: bool,
}

/// PROXY protocol version written toward targets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProxyVersion {
    V1,
    V2,
}

impl ProxyVersion {
    pub fn as_str(self) -> &'static str {
        match self {
            ProxyVersion::V1 => "v1",
            ProxyVersion::V2 => "v2",
        }
    }
}

/// One SNI route: passed-through TLS whose server name matches `sni` goes to `targets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteConfig {
    /// Lower-case names, exact (`api.example.com`) or wildcard (`*.example.com`); never empty.
    pub sni: Vec<String>,
    /// Never empty.
    pub targets: Vec<TargetConfig>,
    pub balance: Balance,
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
    /// On SIGUSR2, move established pairs to the new process (`false`: they drain here).
    pub upgrade_migrate: bool,
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
pub const DEFAULT_PROXY_HEADER_TIMEOUT: Duration = Duration::from_secs(3);

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
            upgrade_migrate: true,
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
            splice_auto: true,
            send_proxy: None,
            accept_proxy: false,
            proxy_header_timeout: DEFAULT_PROXY_HEADER_TIMEOUT,
            allow: Vec::new(),
            deny: Vec::new(),
            max_conns_per_source: None,
            routes: Vec::new(),
            sni_required: false,
        }
    }

    /// Every target of the app, default route first, each name once.
    pub fn all_targets(&self) -> impl Iterator<Item = &TargetConfig> {
        let mut seen: Vec<&str> = Vec::new();
        self.targets
            .iter()
            .chain(self.routes.iter().flat_map(|r| r.targets.iter()))
            .filter(move |t| {
                let new = !seen.contains(&t.name.as_str());
                if new {
                    seen.push(&t.name);
                }
                new
            })
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
