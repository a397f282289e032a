//! Defaults, precedence (CLI flag > app setting > `[defaults]` > built-in) and validation.
//!
//! The three on-disk formats (`file.rs`, `json.rs`, `pipe.rs`) each turn their text into a
//! [`RawDoc`]: the values as written, each with the line it came from. This module resolves a
//! `RawDoc` into a [`Config`] — parsing durations, addresses and policies, resolving host names
//! (the only blocking call here: `ToSocketAddrs` at load time), applying precedence and checking
//! every rule — and reports the first problem as a one-line [`ConfigError`] that names the file,
//! the line, the app and the key. It must never open sockets or panic on input.

use std::collections::HashSet;
use std::fmt;
use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::{
    ActiveHealth, AppConfig, Balance, Config, DEFAULT_CONNECT_TIMEOUT, HealthConfig, TargetConfig,
    Workers,
};

/// Good probes in a row that bring a down target back, when `[health]` does not say.
pub const DEFAULT_RISE: u32 = 2;
/// Probe connect timeout when `[health]` does not say (never longer than the interval).
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// Smallest accepted `buffer_size`.
pub const MIN_BUFFER_SIZE: usize = 1024;
/// Largest accepted `buffer_size` (16 MiB).
pub const MAX_BUFFER_SIZE: usize = 16 << 20;
/// Largest accepted target `weight`.
pub const MAX_WEIGHT: u32 = 1000;

const MAX_WORKERS: i64 = 4096;
const MAX_CONNS_LIMIT: i64 = 100_000_000;
const MAX_EVENTS_LIMIT: i64 = 1 << 20;
const MAX_BACKLOG: i64 = 1 << 20;
const MAX_RETRIES: i64 = 1000;
const MAX_CPU: i64 = 1 << 16;

/// Values given on the command line; `Some` wins over the file.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Overrides {
    pub workers: Option<Workers>,
    pub cpu_pin: Option<Vec<usize>>,
    pub max_conns: Option<usize>,
    pub buffer_size: Option<usize>,
    pub max_events: Option<usize>,
    pub backlog: Option<i32>,
    pub connect_timeout: Option<Duration>,
    /// `Some(None)` = explicitly off.
    pub idle_timeout: Option<Option<Duration>>,
    pub grace: Option<Duration>,
    pub drain_delay: Option<Duration>,
    /// `Some(None)` = explicitly off.
    pub log_interval: Option<Option<Duration>>,
    pub admin: Option<std::net::SocketAddr>,
    pub access_log: Option<bool>,
    pub splice: Option<bool>,
}

/// A configuration error: names the file, the line (where known), the app and the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: Option<String>,
    pub line: Option<usize>,
    pub app: Option<String>,
    pub key: Option<String>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{file}")?;
            if let Some(line) = self.line {
                write!(f, ":{line}")?;
            }
            write!(f, ": ")?;
        }
        if let Some(app) = &self.app {
            write!(f, "app '{app}': ")?;
        }
        if let Some(key) = &self.key {
            write!(f, "key '{key}': ")?;
        }
        write!(f, "{}", self.message)
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// An error about `key` of `app` (either may be absent) at `line` of the file being loaded;
    /// `file` is filled in by [`load_file`] / [`load_str`].
    pub fn new(
        line: Option<usize>,
        app: Option<&str>,
        key: Option<&str>,
        message: impl Into<String>,
    ) -> ConfigError {
        ConfigError {
            file: None,
            line,
            app: app.map(str::to_string),
            key: key.map(str::to_string),
            message: one_line(&message.into()),
        }
    }
}

/// Error messages are always one line (a multi-line message from a parser is folded).
fn one_line(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for (i, part) in s
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .enumerate()
    {
        if i > 0 {
            out.push_str("; ");
        }
        out.push_str(part);
    }
    out
}

/// Parse "250ms", "5s", "10m", "1h", "off" (-> `None`). A bare number is seconds.
pub fn parse_duration(s: &str) -> Result<Option<Duration>, String> {
    let t = s.trim();
    if t.eq_ignore_ascii_case("off") || t.eq_ignore_ascii_case("none") {
        return Ok(None);
    }
    let split = t
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    if num.is_empty() {
        return Err(format!(
            "invalid duration '{s}' (use e.g. 250ms, 5s, 10m, off)"
        ));
    }
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration '{s}' (use e.g. 250ms, 5s, 10m, off)"))?;
    let mult = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => {
            return Err(format!(
                "invalid duration unit in '{s}' (use ms, s, m, h or off)"
            ));
        }
    };
    let secs = value * mult;
    if !secs.is_finite() || !(0.0..=1e9).contains(&secs) {
        return Err(format!("duration '{s}' out of range"));
    }
    Ok(Some(Duration::from_secs_f64(secs)))
}

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

fn load_text(text: &str, format: Format, ov: &Overrides) -> Result<Config, ConfigError> {
    let raw = match format {
        Format::Toml => super::file::parse(text)?,
        Format::Json => super::json::parse(text)?,
        Format::Pipe => super::pipe::parse(text)?,
    };
    let mut cfg = resolve(raw)?;
    apply_overrides(&mut cfg, ov)?;
    Ok(cfg)
}

// ---------------------------------------------------------------------------------------------
// The format-neutral raw document.

/// A value as written in the file, with the 1-based line it is on (when the format has lines).
#[derive(Debug, Clone, PartialEq)]
pub struct At<T> {
    pub value: T,
    pub line: Option<usize>,
}

impl<T> At<T> {
    pub fn new(value: T, line: Option<usize>) -> At<T> {
        At { value, line }
    }
}

/// `workers` as written: an integer or a string (only "auto" is valid).
#[derive(Debug, Clone, PartialEq)]
pub enum RawWorkers {
    Count(i64),
    Word(String),
}

/// One listen entry as written.
#[derive(Debug, Clone, PartialEq)]
pub enum RawListen {
    /// "ip:port" (IPv6 in brackets).
    Addr(String),
    /// A bare port, bound on 0.0.0.0.
    Port(i64),
}

/// A listen entry with the key it was written under (`listen`, `ports`, `Ports`, `local_port`).
#[derive(Debug, Clone, PartialEq)]
pub struct RawListenAt {
    pub listen: RawListen,
    pub key: &'static str,
    pub line: Option<usize>,
}

/// One target as written: "host:port" and an optional weight.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTarget {
    pub spec: String,
    pub weight: Option<At<i64>>,
    /// Key to blame when the address is wrong (`targets`, `Targets`, `remote_host`).
    pub key: &'static str,
    pub line: Option<usize>,
}

/// A `health` table as written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawHealth {
    pub interval: Option<At<String>>,
    pub timeout: Option<At<String>>,
    pub down_time: Option<At<String>>,
    pub rise: Option<At<i64>>,
    pub fall: Option<At<i64>>,
}

/// Settings an app may carry and `[defaults]` may give for every app.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawAppSettings {
    pub connect_timeout: Option<At<String>>,
    pub idle_timeout: Option<At<String>>,
    pub balance: Option<At<String>>,
    pub retries: Option<At<i64>>,
    pub access_log: Option<At<bool>>,
    pub splice: Option<At<bool>>,
    pub health: Option<RawHealth>,
}

/// One app as written.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawApp {
    /// Line where the app starts.
    pub line: Option<usize>,
    /// Key naming the app in this format (`name`, `Name`).
    pub name_key: &'static str,
    pub name: Option<At<String>>,
    /// Key and line to blame when there is no listen entry at all.
    pub listen_key: &'static str,
    pub listen_line: Option<usize>,
    pub listen: Vec<RawListenAt>,
    /// Key and line to blame when `targets` is missing or empty.
    pub targets_key: &'static str,
    pub targets_line: Option<usize>,
    pub targets: Vec<RawTarget>,
    pub max_conns: Option<At<i64>>,
    pub settings: RawAppSettings,
}

/// Process-wide settings (`[defaults]` minus the per-app ones, and `[admin]`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawGlobals {
    pub workers: Option<At<RawWorkers>>,
    pub cpu_pin: Option<At<Vec<At<i64>>>>,
    pub max_conns: Option<At<i64>>,
    pub buffer_size: Option<At<i64>>,
    pub max_events: Option<At<i64>>,
    pub backlog: Option<At<i64>>,
    pub grace_period: Option<At<String>>,
    pub drain_delay: Option<At<String>>,
    pub log_interval: Option<At<String>>,
    pub admin_listen: Option<At<String>>,
}

/// A whole file as written, in any format.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawDoc {
    pub globals: RawGlobals,
    pub defaults: RawAppSettings,
    pub apps: Vec<RawApp>,
    /// Key to blame when there are no apps (`app`, `Apps`).
    pub apps_key: Option<&'static str>,
}

// ---------------------------------------------------------------------------------------------
// Resolution.

/// Where a value sits: app (if any) and key prefix, for error messages.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    app: Option<&'a str>,
    /// "" for app keys, "defaults." for `[defaults]`.
    prefix: &'static str,
}

impl Ctx<'_> {
    fn err(&self, line: Option<usize>, key: &str, msg: impl Into<String>) -> ConfigError {
        let full = format!("{}{key}", self.prefix);
        ConfigError::new(line, self.app, Some(&full), msg)
    }
}

fn int_in(ctx: Ctx<'_>, key: &str, v: &At<i64>, min: i64, max: i64) -> Result<i64, ConfigError> {
    if v.value < min || v.value > max {
        return Err(ctx.err(
            v.line,
            key,
            format!("{} is out of range ({min}..={max})", v.value),
        ));
    }
    Ok(v.value)
}

fn usize_in(
    ctx: Ctx<'_>,
    key: &str,
    v: &At<i64>,
    min: i64,
    max: i64,
) -> Result<usize, ConfigError> {
    let n = int_in(ctx, key, v, min, max)?;
    usize::try_from(n).map_err(|_| ctx.err(v.line, key, format!("{n} is out of range")))
}

fn u32_in(ctx: Ctx<'_>, key: &str, v: &At<i64>, min: i64, max: i64) -> Result<u32, ConfigError> {
    let n = int_in(ctx, key, v, min, max)?;
    u32::try_from(n).map_err(|_| ctx.err(v.line, key, format!("{n} is out of range")))
}

/// A duration that may be "off" (`None`); zero is refused (say "off" instead).
fn dur_or_off(ctx: Ctx<'_>, key: &str, v: &At<String>) -> Result<Option<Duration>, ConfigError> {
    match parse_duration(&v.value).map_err(|m| ctx.err(v.line, key, m))? {
        Some(d) if d.is_zero() => Err(ctx.err(
            v.line,
            key,
            format!(
                "'{}' must be greater than 0 (use \"off\" to disable)",
                v.value
            ),
        )),
        other => Ok(other),
    }
}

/// A duration that must be set and greater than zero.
fn dur_positive(ctx: Ctx<'_>, key: &str, v: &At<String>) -> Result<Duration, ConfigError> {
    match parse_duration(&v.value).map_err(|m| ctx.err(v.line, key, m))? {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(ctx.err(
            v.line,
            key,
            format!("'{}' must be a duration greater than 0", v.value),
        )),
    }
}

/// A duration where "off" means zero (grace period, drain delay, down time).
fn dur_or_zero(ctx: Ctx<'_>, key: &str, v: &At<String>) -> Result<Duration, ConfigError> {
    Ok(parse_duration(&v.value)
        .map_err(|m| ctx.err(v.line, key, m))?
        .unwrap_or(Duration::ZERO))
}

fn balance(ctx: Ctx<'_>, v: &At<String>) -> Result<Balance, ConfigError> {
    Balance::parse(v.value.trim()).ok_or_else(|| {
        ctx.err(
            v.line,
            "balance",
            format!(
                "unknown policy '{}' (use round-robin, random, least-conn or source-hash)",
                v.value
            ),
        )
    })
}

/// App settings after `[defaults]` and built-ins, before CLI overrides.
#[derive(Debug, Clone)]
struct Settings {
    connect_timeout: Duration,
    idle_timeout: Option<Duration>,
    balance: Balance,
    retries: Option<usize>,
    access_log: bool,
    splice: bool,
    health: HealthSettings,
}

/// Health settings before deciding whether active checks are on.
#[derive(Debug, Clone)]
struct HealthSettings {
    /// `None` = no active checks.
    interval: Option<Duration>,
    timeout: Option<Duration>,
    down_time: Duration,
    rise: u32,
    fall: u32,
}

impl HealthSettings {
    fn builtin() -> HealthSettings {
        let d = HealthConfig::default();
        HealthSettings {
            interval: None,
            timeout: None,
            down_time: d.down_time,
            rise: DEFAULT_RISE,
            fall: d.fall,
        }
    }

    fn resolve(&self) -> HealthConfig {
        HealthConfig {
            fall: self.fall,
            down_time: self.down_time,
            active: self.interval.map(|interval| ActiveHealth {
                interval,
                timeout: self
                    .timeout
                    .unwrap_or_else(|| DEFAULT_PROBE_TIMEOUT.min(interval)),
                rise: self.rise,
                fall: self.fall,
            }),
        }
    }
}

impl Settings {
    fn builtin() -> Settings {
        Settings {
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            idle_timeout: None,
            balance: Balance::default(),
            retries: None,
            access_log: false,
            splice: false,
            health: HealthSettings::builtin(),
        }
    }

    /// `raw` (an app's or `[defaults]`'s) layered over `self`.
    fn layer(&self, ctx: Ctx<'_>, raw: &RawAppSettings) -> Result<Settings, ConfigError> {
        let mut s = self.clone();
        if let Some(v) = &raw.connect_timeout {
            s.connect_timeout = dur_positive(ctx, "connect_timeout", v)?;
        }
        if let Some(v) = &raw.idle_timeout {
            s.idle_timeout = dur_or_off(ctx, "idle_timeout", v)?;
        }
        if let Some(v) = &raw.balance {
            s.balance = balance(ctx, v)?;
        }
        if let Some(v) = &raw.retries {
            s.retries = Some(usize_in(ctx, "retries", v, 0, MAX_RETRIES)?);
        }
        if let Some(v) = &raw.access_log {
            s.access_log = v.value;
        }
        if let Some(v) = &raw.splice {
            s.splice = v.value;
        }
        if let Some(h) = &raw.health {
            let hs = &mut s.health;
            if let Some(v) = &h.interval {
                hs.interval = dur_or_off(ctx, "health.interval", v)?;
            }
            if let Some(v) = &h.timeout {
                hs.timeout = Some(dur_positive(ctx, "health.timeout", v)?);
            }
            if let Some(v) = &h.down_time {
                hs.down_time = dur_or_zero(ctx, "health.down_time", v)?;
            }
            if let Some(v) = &h.rise {
                hs.rise = u32_in(ctx, "health.rise", v, 1, 1000)?;
            }
            if let Some(v) = &h.fall {
                hs.fall = u32_in(ctx, "health.fall", v, 1, 1000)?;
            }
        }
        Ok(s)
    }
}

/// Parse "ip:port" / "[v6]:port" for a listen entry.
fn listen_addr(ctx: Ctx<'_>, l: &RawListenAt) -> Result<SocketAddr, ConfigError> {
    match &l.listen {
        RawListen::Port(p) => {
            if !(0..=65535).contains(p) {
                return Err(ctx.err(
                    l.line,
                    l.key,
                    format!("port {p} is out of range (0..=65535; 0 = any free port)"),
                ));
            }
            let port = u16::try_from(*p)
                .map_err(|_| ctx.err(l.line, l.key, format!("port {p} is out of range")))?;
            Ok(SocketAddr::from(([0, 0, 0, 0], port)))
        }
        RawListen::Addr(s) => {
            let addr: SocketAddr = s.trim().parse().map_err(|_| {
                ctx.err(
                    l.line,
                    l.key,
                    format!(
                        "'{s}' is not an ip:port address (e.g. \"0.0.0.0:8080\" or \"[::]:8080\")"
                    ),
                )
            })?;
            Ok(addr)
        }
    }
}

/// Split "host:port" / "[v6]:port" into host and port text.
fn split_host_port(spec: &str) -> Option<(&str, &str)> {
    let spec = spec.trim();
    if let Some(rest) = spec.strip_prefix('[') {
        let (host, after) = rest.split_once(']')?;
        let port = after.strip_prefix(':')?;
        return Some((host, port));
    }
    let (host, port) = spec.rsplit_once(':')?;
    if host.contains(':') {
        // A bare IPv6 address without brackets is ambiguous.
        return None;
    }
    Some((host, port))
}

/// Resolve a target "host:port": an IP literal directly, a name with the system resolver
/// (the first IPv4 address if there is one, else the first address).
fn target_addr(ctx: Ctx<'_>, t: &RawTarget) -> Result<SocketAddr, ConfigError> {
    let spec = t.spec.trim();
    if let Ok(addr) = spec.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(ctx.err(
                t.line,
                t.key,
                format!("target '{spec}': port 0 is not allowed (1..=65535)"),
            ));
        }
        return Ok(addr);
    }
    let (host, port) = split_host_port(spec).ok_or_else(|| {
        ctx.err(
            t.line,
            t.key,
            format!("target '{spec}' is not host:port (IPv6 goes in brackets: \"[::1]:80\")"),
        )
    })?;
    let port: u16 = match port.trim().parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => {
            return Err(ctx.err(
                t.line,
                t.key,
                format!("target '{spec}': port '{port}' is out of range (1..=65535)"),
            ));
        }
    };
    let host = host.trim();
    if host.is_empty() {
        return Err(ctx.err(t.line, t.key, format!("target '{spec}' has no host")));
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    let addrs: Vec<SocketAddr> = (host, port)
        .to_socket_addrs()
        .map_err(|e| ctx.err(t.line, t.key, format!("cannot resolve host '{host}': {e}")))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| {
            ctx.err(
                t.line,
                t.key,
                format!("cannot resolve host '{host}': no addresses"),
            )
        })
}

/// Whether binding `a` and `b` would collide (same port, and the same IP or a wildcard of the
/// same family). Port 0 (any free port) never collides: each such listener gets its own port.
fn listen_overlap(a: SocketAddr, b: SocketAddr) -> bool {
    if a.port() == 0 || b.port() == 0 || a.port() != b.port() || a.is_ipv4() != b.is_ipv4() {
        return false;
    }
    a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified()
}

/// Whether connecting to `target` would reach our own listener `listen`.
fn is_own_listener(target: SocketAddr, listen: SocketAddr) -> bool {
    if target.port() != listen.port() {
        return false;
    }
    let t = canonical(target.ip());
    let l = canonical(listen.ip());
    t == l || (l.is_unspecified() && (t.is_loopback() || t.is_unspecified()))
}

fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6
            .to_ipv4_mapped()
            .map(IpAddr::V4)
            .unwrap_or(IpAddr::V6(v6)),
        v4 => v4,
    }
}

/// Resolve and validate a raw document into a `Config` (no CLI overrides yet).
pub fn resolve(raw: RawDoc) -> Result<Config, ConfigError> {
    let g = &raw.globals;
    let dctx = Ctx {
        app: None,
        prefix: "defaults.",
    };
    let mut cfg = Config::default();

    if let Some(w) = &g.workers {
        cfg.workers = match &w.value {
            RawWorkers::Count(n) => Workers::Count(usize_in(
                dctx,
                "workers",
                &At::new(*n, w.line),
                1,
                MAX_WORKERS,
            )?),
            RawWorkers::Word(s) if s.trim().eq_ignore_ascii_case("auto") => Workers::Auto,
            RawWorkers::Word(s) => {
                return Err(dctx.err(
                    w.line,
                    "workers",
                    format!("'{s}' is not a number of workers or \"auto\""),
                ));
            }
        };
    }
    if let Some(list) = &g.cpu_pin {
        let mut cpus = Vec::with_capacity(list.value.len());
        for c in &list.value {
            cpus.push(usize_in(dctx, "cpu_pin", c, 0, MAX_CPU)?);
        }
        cfg.cpu_pin = cpus;
    }
    if let Some(v) = &g.max_conns {
        cfg.max_conns = Some(usize_in(dctx, "max_conns", v, 1, MAX_CONNS_LIMIT)?);
    }
    if let Some(v) = &g.buffer_size {
        cfg.buffer_size = usize_in(
            dctx,
            "buffer_size",
            v,
            MIN_BUFFER_SIZE as i64,
            MAX_BUFFER_SIZE as i64,
        )?;
    }
    if let Some(v) = &g.max_events {
        cfg.max_events = usize_in(dctx, "max_events", v, 1, MAX_EVENTS_LIMIT)?;
    }
    if let Some(v) = &g.backlog {
        cfg.backlog = i32::try_from(int_in(dctx, "backlog", v, 1, MAX_BACKLOG)?)
            .map_err(|_| dctx.err(v.line, "backlog", "out of range"))?;
    }
    if let Some(v) = &g.grace_period {
        cfg.grace = dur_or_zero(dctx, "grace_period", v)?;
    }
    if let Some(v) = &g.drain_delay {
        cfg.drain_delay = dur_or_zero(dctx, "drain_delay", v)?;
    }
    if let Some(v) = &g.log_interval {
        cfg.log_interval = dur_or_off(dctx, "log_interval", v)?;
    }
    if let Some(v) = &g.admin_listen {
        let actx = Ctx {
            app: None,
            prefix: "admin.",
        };
        let addr: SocketAddr = v.value.trim().parse().map_err(|_| {
            actx.err(
                v.line,
                "listen",
                format!("'{}' is not an ip:port address", v.value),
            )
        })?;
        cfg.admin = Some(addr);
    }

    let defaults = Settings::builtin().layer(dctx, &raw.defaults)?;

    if raw.apps.is_empty() {
        return Err(ConfigError::new(
            None,
            None,
            raw.apps_key,
            "no apps defined: at least one app is required",
        ));
    }

    let mut names: HashSet<String> = HashSet::new();
    // Every listen address so far, with its app and line (for overlap errors).
    let mut bound: Vec<(SocketAddr, String)> = Vec::new();
    // Per app, the line of each target (for the own-listener check below).
    let mut target_lines: Vec<Vec<(Option<usize>, &'static str)>> = Vec::new();

    for (index, app) in raw.apps.iter().enumerate() {
        let name = match &app.name {
            Some(n) if !n.value.trim().is_empty() => n,
            Some(n) => {
                return Err(ConfigError::new(
                    n.line,
                    None,
                    Some(app.name_key),
                    format!("app #{} has an empty name", index + 1),
                ));
            }
            None => {
                return Err(ConfigError::new(
                    app.line,
                    None,
                    Some(app.name_key),
                    format!("app #{} has no name", index + 1),
                ));
            }
        };
        let ctx = Ctx {
            app: Some(&name.value),
            prefix: "",
        };
        if !names.insert(name.value.clone()) {
            return Err(ctx.err(
                name.line,
                app.name_key,
                format!("duplicate app name '{}'", name.value),
            ));
        }

        if app.listen.is_empty() {
            return Err(ctx.err(
                app.listen_line.or(app.line),
                app.listen_key,
                if app.listen_key == "Ports" {
                    "no listen address: give at least one port"
                } else {
                    "no listen address: give listen = [\"ip:port\", ...] and/or ports = [...]"
                },
            ));
        }
        let mut listen = Vec::with_capacity(app.listen.len());
        for l in &app.listen {
            let addr = listen_addr(ctx, l)?;
            if let Some((other, owner)) = bound.iter().find(|(b, _)| listen_overlap(*b, addr)) {
                let msg = if owner == &name.value {
                    format!("{addr} is listed twice (overlaps {other})")
                } else {
                    format!("{addr} is already used by app '{owner}' ({other})")
                };
                return Err(ctx.err(l.line, l.key, msg));
            }
            bound.push((addr, name.value.clone()));
            listen.push(addr);
        }

        if app.targets.is_empty() {
            return Err(ctx.err(
                app.targets_line.or(app.line),
                app.targets_key,
                "must not be empty",
            ));
        }
        let mut targets: Vec<TargetConfig> = Vec::with_capacity(app.targets.len());
        let mut lines = Vec::with_capacity(app.targets.len());
        for t in &app.targets {
            let addr = target_addr(ctx, t)?;
            let weight = match &t.weight {
                Some(w) => u32_in(ctx, "weight", w, 1, i64::from(MAX_WEIGHT))?,
                None => 1,
            };
            if let Some(prev) = targets.iter().find(|p| p.addr == addr) {
                return Err(ctx.err(
                    t.line,
                    t.key,
                    format!(
                        "target '{}' is listed twice (same address as '{}'; use weight instead)",
                        t.spec.trim(),
                        prev.name
                    ),
                ));
            }
            if targets.len() >= usize::from(u16::MAX) {
                return Err(ctx.err(t.line, t.key, "too many targets (at most 65535)"));
            }
            targets.push(TargetConfig {
                name: t.spec.trim().to_string(),
                addr,
                weight,
            });
            lines.push((t.line, t.key));
        }
        target_lines.push(lines);

        let s = defaults.layer(ctx, &app.settings)?;
        let max_conns = match &app.max_conns {
            Some(v) => Some(usize_in(ctx, "max_conns", v, 1, MAX_CONNS_LIMIT)?),
            None => None,
        };
        cfg.apps.push(AppConfig {
            name: name.value.clone(),
            listen,
            targets,
            balance: s.balance,
            max_conns,
            connect_timeout: s.connect_timeout,
            idle_timeout: s.idle_timeout,
            retries: s.retries,
            health: s.health.resolve(),
            access_log: s.access_log,
            splice: s.splice,
        });
    }

    // A target that is one of our own listeners would loop connections back into the proxy.
    for (app, lines) in cfg.apps.iter().zip(&target_lines) {
        for (t, (line, key)) in app.targets.iter().zip(lines) {
            if let Some((l, owner)) = bound.iter().find(|(l, _)| is_own_listener(t.addr, *l)) {
                return Err(ConfigError::new(
                    *line,
                    Some(&app.name),
                    Some(key),
                    format!(
                        "target '{}' is this proxy's own listen address {l} (app '{owner}'): it would loop",
                        t.name
                    ),
                ));
            }
        }
    }
    if let Some(admin) = cfg.admin
        && let Some((l, owner)) = bound.iter().find(|(l, _)| listen_overlap(*l, admin))
    {
        return Err(ConfigError::new(
            g.admin_listen.as_ref().and_then(|a| a.line),
            None,
            Some("admin.listen"),
            format!("{admin} overlaps listen address {l} of app '{owner}'"),
        ));
    }
    Ok(cfg)
}

/// Apply command-line overrides (they win over everything in the file) and check the values
/// that came from the command line. Usable for a CLI-only config too.
pub fn apply_overrides(cfg: &mut Config, ov: &Overrides) -> Result<(), ConfigError> {
    let bad = |key: &str, msg: String| {
        Err(ConfigError::new(
            None,
            None,
            Some(key),
            format!("{msg} (from the command line)"),
        ))
    };
    if let Some(w) = ov.workers {
        if w == Workers::Count(0) {
            return bad("workers", "must be at least 1".into());
        }
        cfg.workers = w;
    }
    if let Some(c) = &ov.cpu_pin {
        cfg.cpu_pin = c.clone();
    }
    if let Some(m) = ov.max_conns {
        if m == 0 {
            return bad("max_conns", "must be at least 1".into());
        }
        cfg.max_conns = Some(m);
    }
    if let Some(b) = ov.buffer_size {
        if !(MIN_BUFFER_SIZE..=MAX_BUFFER_SIZE).contains(&b) {
            return bad(
                "buffer_size",
                format!("{b} is out of range ({MIN_BUFFER_SIZE}..={MAX_BUFFER_SIZE})"),
            );
        }
        cfg.buffer_size = b;
    }
    if let Some(e) = ov.max_events {
        if e == 0 {
            return bad("max_events", "must be at least 1".into());
        }
        cfg.max_events = e;
    }
    if let Some(b) = ov.backlog {
        if b < 1 {
            return bad("backlog", "must be at least 1".into());
        }
        cfg.backlog = b;
    }
    if let Some(g) = ov.grace {
        cfg.grace = g;
    }
    if let Some(d) = ov.drain_delay {
        cfg.drain_delay = d;
    }
    if let Some(l) = ov.log_interval {
        cfg.log_interval = l.filter(|d| !d.is_zero());
    }
    if let Some(a) = ov.admin {
        cfg.admin = Some(a);
    }
    if ov.connect_timeout.is_some_and(|t| t.is_zero()) {
        return bad("connect_timeout", "must be greater than 0".into());
    }
    for app in &mut cfg.apps {
        if let Some(t) = ov.connect_timeout {
            app.connect_timeout = t;
        }
        if let Some(i) = ov.idle_timeout {
            app.idle_timeout = i.filter(|d| !d.is_zero());
        }
        if let Some(a) = ov.access_log {
            app.access_log = a;
        }
        if let Some(s) = ov.splice {
            app.splice = s;
        }
    }
    Ok(())
}

/// 1-based line number of byte `offset` in `text`.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    const APP: &str = "[[app]]\nname = \"a\"\nports = [9000]\ntargets = [\"127.0.0.1:9001\"]\n";

    fn load(text: &str, ov: &Overrides) -> Config {
        match load_str(text, "p.toml", ov) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn every_example_in_config_dir_loads() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
        let mut seen = 0;
        for entry in std::fs::read_dir(&dir).expect("config/ exists") {
            let path = entry.expect("dir entry").path();
            if !path.is_file() {
                continue;
            }
            let cfg = match load_file(&path, &Overrides::default()) {
                Ok(c) => c,
                Err(e) => panic!("{e}"),
            };
            assert!(!cfg.apps.is_empty(), "{}", path.display());
            assert_eq!(cfg.source.as_deref(), Some(path.as_path()));
            seen += 1;
        }
        assert!(
            seen >= 3,
            "expected proxy.toml, apps.json and forwarder.conf"
        );
    }

    #[test]
    fn precedence_builtin_defaults_app_cli() {
        // Built-in.
        let c = load(APP, &Overrides::default());
        assert_eq!(c.apps[0].connect_timeout, DEFAULT_CONNECT_TIMEOUT);
        assert!(!c.apps[0].access_log);
        // [defaults] over built-in.
        let text =
            format!("[defaults]\nconnect_timeout = \"3s\"\naccess_log = true\nworkers = 4\n{APP}");
        let c = load(&text, &Overrides::default());
        assert_eq!(c.apps[0].connect_timeout, Duration::from_secs(3));
        assert!(c.apps[0].access_log);
        assert_eq!(c.workers, Workers::Count(4));
        // App over [defaults].
        let text = format!("{text}connect_timeout = \"1s\"\naccess_log = false\n");
        let c = load(&text, &Overrides::default());
        assert_eq!(c.apps[0].connect_timeout, Duration::from_secs(1));
        assert!(!c.apps[0].access_log);
        // CLI over everything.
        let ov = Overrides {
            connect_timeout: Some(Duration::from_millis(700)),
            access_log: Some(true),
            workers: Some(Workers::Auto),
            idle_timeout: Some(Some(Duration::from_secs(9))),
            buffer_size: Some(4096),
            max_conns: Some(77),
            admin: Some("127.0.0.1:9999".parse().expect("addr")),
            ..Overrides::default()
        };
        let c = load(&text, &ov);
        assert_eq!(c.apps[0].connect_timeout, Duration::from_millis(700));
        assert!(c.apps[0].access_log);
        assert_eq!(c.apps[0].idle_timeout, Some(Duration::from_secs(9)));
        assert_eq!(c.workers, Workers::Auto);
        assert_eq!(c.buffer_size, 4096);
        assert_eq!(c.max_conns, Some(77));
        assert_eq!(c.admin, Some("127.0.0.1:9999".parse().expect("addr")));
    }

    #[test]
    fn health_defaults_layer_per_key() {
        let text = format!(
            "[defaults.health]\ninterval = \"5s\"\nfall = 4\n{APP}[app.health]\nrise = 3\n\n[[app]]\nname = \"b\"\nports = [9002]\ntargets = [\"127.0.0.1:9003\"]\n[app.health]\ninterval = \"off\"\n"
        );
        let c = load(&text, &Overrides::default());
        let a = c.apps[0].health.active.expect("active from defaults");
        assert_eq!(a.interval, Duration::from_secs(5));
        assert_eq!(a.timeout, DEFAULT_PROBE_TIMEOUT);
        assert_eq!((a.rise, a.fall), (3, 4));
        assert_eq!(c.apps[0].health.fall, 4);
        assert_eq!(c.apps[1].health.active, None);
        // A short interval caps the default probe timeout.
        let text = format!("{APP}[app.health]\ninterval = \"200ms\"\n");
        let c = load(&text, &Overrides::default());
        let a = c.apps[0].health.active.expect("active");
        assert_eq!(a.timeout, Duration::from_millis(200));
        assert_eq!((a.rise, a.fall), (DEFAULT_RISE, 3));
    }

    #[test]
    fn cli_overrides_are_checked() {
        let ov = Overrides {
            buffer_size: Some(10),
            ..Overrides::default()
        };
        let e = load_str(APP, "p.toml", &ov).expect_err("too small");
        assert!(e.to_string().contains("key 'buffer_size'"), "{e}");
        assert!(e.to_string().contains("command line"), "{e}");
    }

    #[test]
    fn overlapping_and_looping_addresses_are_refused() {
        let two = |l1: &str, l2: &str, t2: &str| {
            format!(
                "[[app]]\nname = \"a\"\nlisten = [{l1}]\ntargets = [\"127.0.0.1:9001\"]\n[[app]]\nname = \"b\"\nlisten = [{l2}]\ntargets = [{t2}]\n"
            )
        };
        let err =
            |t: String| load_str(&t, "p.toml", &Overrides::default()).map_err(|e| e.to_string());
        // Wildcard and specific address on the same port collide.
        let e = err(two(
            "\"0.0.0.0:9000\"",
            "\"127.0.0.1:9000\"",
            "\"127.0.0.1:9002\"",
        ));
        assert!(e.is_err_and(|e| e.starts_with("p.toml:7: app 'b': key 'listen'")));
        // IPv4 and IPv6 wildcards on one port are two sockets (IPV6_V6ONLY).
        assert!(
            err(two(
                "\"0.0.0.0:9000\"",
                "\"[::]:9000\"",
                "\"127.0.0.1:9002\""
            ))
            .is_ok()
        );
        // Twice in one app.
        let e = err("[[app]]\nname = \"a\"\nlisten = [\"127.0.0.1:9000\"]\nports = [9000]\ntargets = [\"127.0.0.1:1\"]\n".into());
        assert!(e.is_err_and(|e| e.starts_with("p.toml:4: app 'a': key 'ports'") && e.contains("twice")));
        // A target that is our own listener loops.
        let e = err(two(
            "\"0.0.0.0:9000\"",
            "\"127.0.0.1:9005\"",
            "\"127.0.0.1:9000\"",
        ));
        assert!(e.is_err_and(
            |e| e.starts_with("p.toml:8: app 'b': key 'targets'") && e.contains("loop")
        ));
        // Admin on an app's address.
        let e = err(format!("[admin]\nlisten = \"127.0.0.1:9000\"\n{APP}"));
        assert!(e.is_err_and(|e| e.starts_with("p.toml:2: key 'admin.listen'")));
    }

    #[test]
    fn targets_resolve_and_report_bad_hosts() {
        let t = |targets: &str| {
            load_str(
                &format!("[[app]]\nname = \"a\"\nports = [9000]\ntargets = [{targets}]\n"),
                "p.toml",
                &Overrides::default(),
            )
        };
        let c = t("\"localhost:80\", \"[::1]:81\"").expect("loads");
        assert!(
            c.apps[0].targets[0].addr.is_ipv4(),
            "IPv4 preferred for names"
        );
        let e = t("\"no-such-host.invalid:80\"").expect_err("unresolvable");
        let e = e.to_string();
        assert!(e.starts_with("p.toml:4: app 'a': key 'targets'"), "{e}");
        assert!(e.contains("no-such-host.invalid"), "{e}");
        for bad in [
            "\"127.0.0.1\"",
            "\"127.0.0.1:0\"",
            "\"::1:80\"",
            "\":80\"",
            "\"h:99999\"",
        ] {
            assert!(t(bad).is_err(), "{bad}");
        }
        let e = t("\"127.0.0.1:80\", \"127.0.0.1:80\"").expect_err("duplicate");
        assert!(e.to_string().contains("twice"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(
            parse_duration("250ms"),
            Ok(Some(Duration::from_millis(250)))
        );
        assert_eq!(
            parse_duration("1.5s"),
            Ok(Some(Duration::from_millis(1500)))
        );
        assert_eq!(parse_duration("10m"), Ok(Some(Duration::from_secs(600))));
        assert_eq!(parse_duration("2h"), Ok(Some(Duration::from_secs(7200))));
        assert_eq!(parse_duration("7"), Ok(Some(Duration::from_secs(7))));
        assert_eq!(parse_duration("off"), Ok(None));
        for bad in ["", "ms", "5 parsecs", "-1s", "1e3s", "5d", "1.2.3s"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn unknown_extension_is_an_error() {
        let e =
            load_file(Path::new("/nonexistent/cfg.yaml"), &Overrides::default()).expect_err("yaml");
        assert!(e.to_string().starts_with("/nonexistent/cfg.yaml: "), "{e}");
        let e = load_file(Path::new("/nonexistent/cfg.toml"), &Overrides::default())
            .expect_err("missing");
        assert!(
            e.to_string()
                .starts_with("/nonexistent/cfg.toml: cannot read"),
            "{e}"
        );
    }
}
