//! Defaults, precedence (CLI flag > app setting > `[defaults]` > built-in) and validation.
//!
//! The parsers (`file.rs`, `json.rs`, `pipe.rs`, `args.rs`) each turn their input into a
//! [`RawDoc`]: the values as written, each with the line it came from. This module resolves a
//! `RawDoc` into a [`Config`] — parsing durations, addresses and policies, resolving host names
//! (the only blocking call here: `ToSocketAddrs` at load time), applying precedence and checking
//! every rule — and reports the first problem as a one-line [`ConfigError`] that names the file,
//! the line, the app and the key. It depends only on `raw.rs` and `error.rs` (and the resolved
//! types of `mod.rs`): it never calls a parser, opens a socket or panics on input.
//!
//! Shape: [`resolve`] = `resolve_globals` + `resolve_app` per app (name, listeners, targets,
//! settings) + the cross-app checks `check_loops` and `check_admin`; then [`apply_overrides`]
//! puts the command line on top.
//!
//! # Adding a per-app key (say `foo`, allowed in `[[app]]` and in `[defaults]`)
//!
//! 1. `raw.rs`: a field `foo: Option<At<T>>` in [`RawAppSettings`] (the value as written).
//! 2. `file.rs`: the field in both serde mirrors, `Defaults` and `AppFile` (serde cannot
//!    flatten `Spanned` fields under `deny_unknown_fields`, hence two), and one line in the
//!    `app_settings!` macro that copies them into `RawAppSettings`. The JSON and pipe formats
//!    carry no per-app settings: nothing to do there.
//! 3. `resolve.rs`: one `set(...)` line in `Settings::layer` (parse and range-check the value).
//! 4. `mod.rs`: the field in `AppConfig` and its built-in default in `AppConfig::new` — the
//!    only home of per-app built-ins (`Settings::builtin` starts from it, and so does the CLI).
//!
//! Only if it also gets a command-line flag: a field in [`Overrides`], one line in
//! `override_app` (and its check, if any, in `check_overrides`), and the flag in `cli.rs`
//! (`Cli` and `Cli::overrides`).

use std::net::{IpAddr, SocketAddr, ToSocketAddrs};
use std::time::Duration;

use super::error::{ConfigError, escape_controls};
use super::raw::{
    At, RawApp, RawAppSettings, RawDoc, RawGlobals, RawHealth, RawListen, RawListenAt, RawSplice,
    RawTarget, RawWorkers,
};
use super::{
    ActiveHealth, AppConfig, Balance, Cidr, Config, HealthConfig, ProxyVersion, RouteConfig,
    TargetConfig, Workers,
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
/// Largest accepted worker count, in a file and on the command line alike.
pub const MAX_WORKERS: usize = 4096;
/// Largest accepted CPU number in `cpu_pin`, in a file and on the command line alike.
pub const MAX_CPU: usize = 1 << 16;
/// Longest app name (characters of `[A-Za-z0-9._-]`).
pub const MAX_APP_NAME: usize = 64;
/// Longest target name (the target as written, characters of `[A-Za-z0-9._:[]%-]`).
pub const MAX_TARGET_NAME: usize = 255;

const MAX_CONNS_LIMIT: i64 = 100_000_000;
const MAX_EVENTS_LIMIT: i64 = 1 << 20;
const MAX_BACKLOG: i64 = 1 << 20;
const MAX_RETRIES: i64 = 1000;
const MAX_TARGETS: usize = u16::MAX as usize;

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

// ---------------------------------------------------------------------------------------------
// Values.

/// Where a value sits: app (if any) and key prefix, for error messages.
#[derive(Clone, Copy)]
struct Ctx<'a> {
    app: Option<&'a str>,
    /// "" for app keys, "defaults." for `[defaults]`, "admin." for `[admin]`.
    prefix: &'static str,
}

/// Context of `[defaults]` keys.
const DEFAULTS: Ctx<'static> = Ctx {
    app: None,
    prefix: "defaults.",
};

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

fn proxy_version(ctx: Ctx<'_>, v: &At<String>) -> Result<ProxyVersion, ConfigError> {
    match v.value.trim().to_ascii_lowercase().as_str() {
        "v1" | "1" => Ok(ProxyVersion::V1),
        "v2" | "2" => Ok(ProxyVersion::V2),
        _ => Err(ctx.err(
            v.line,
            "send_proxy",
            format!(
                "'{}' is not a PROXY protocol version (use \"v1\" or \"v2\")",
                escape_controls(&v.value)
            ),
        )),
    }
}

/// A list of CIDRs (`10.0.0.0/8`, `::1/128`, or a bare address); each error names its line.
fn cidrs(ctx: Ctx<'_>, key: &str, v: &At<Vec<At<String>>>) -> Result<Vec<Cidr>, ConfigError> {
    v.value
        .iter()
        .map(|c| {
            Cidr::parse(c.value.trim())
                .map_err(|m| ctx.err(c.line.or(v.line), key, escape_controls(&m)))
        })
        .collect()
}

/// Store `f(value)` in `slot` when the value was written.
fn set<T, U>(
    slot: &mut U,
    raw: &Option<At<T>>,
    f: impl FnOnce(&At<T>) -> Result<U, ConfigError>,
) -> Result<(), ConfigError> {
    if let Some(v) = raw {
        *slot = f(v)?;
    }
    Ok(())
}

// ---------------------------------------------------------------------------------------------
// Per-app settings and their layering.

/// An app's settings after built-ins, `[defaults]` and the app's own keys, before CLI overrides:
/// an [`AppConfig`] used as a template (`name`, `listen`, `targets` and `max_conns` are set per
/// app by [`Settings::into_app`]) plus the health keys, which become a [`HealthConfig`] only at
/// the end (active checks are on when `interval` is set, and the probe timeout depends on it).
#[derive(Debug, Clone)]
struct Settings {
    app: AppConfig,
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

impl Settings {
    /// The built-in defaults: those of [`AppConfig::new`].
    fn builtin() -> Settings {
        let app = AppConfig::new("", Vec::new(), Vec::new());
        let health = HealthSettings {
            interval: app.health.active.map(|a| a.interval),
            timeout: app.health.active.map(|a| a.timeout),
            down_time: app.health.down_time,
            rise: app.health.active.map_or(DEFAULT_RISE, |a| a.rise),
            fall: app.health.fall,
        };
        Settings { app, health }
    }

    /// `raw` (an app's or `[defaults]`'s) layered over `self`.
    fn layer(&self, ctx: Ctx<'_>, raw: &RawAppSettings) -> Result<Settings, ConfigError> {
        let mut s = self.clone();
        let a = &mut s.app;
        set(&mut a.connect_timeout, &raw.connect_timeout, |v| {
            dur_positive(ctx, "connect_timeout", v)
        })?;
        set(&mut a.idle_timeout, &raw.idle_timeout, |v| {
            dur_or_off(ctx, "idle_timeout", v)
        })?;
        set(&mut a.balance, &raw.balance, |v| balance(ctx, v))?;
        set(&mut a.retries, &raw.retries, |v| {
            usize_in(ctx, "retries", v, 0, MAX_RETRIES).map(Some)
        })?;
        set(&mut a.access_log, &raw.access_log, |v| Ok(v.value))?;
        if let Some(v) = &raw.splice {
            (a.splice, a.splice_auto) = match &v.value {
                RawSplice::Bool(b) => (*b, false),
                RawSplice::Word(w) if w.trim() == "auto" => (false, true),
                RawSplice::Word(w) => {
                    return Err(ctx.err(
                        v.line,
                        "splice",
                        format!(
                            "must be true, false or \"auto\", not \"{}\"",
                            escape_controls(w)
                        ),
                    ));
                }
            };
        }
        set(&mut a.send_proxy, &raw.send_proxy, |v| {
            proxy_version(ctx, v).map(Some)
        })?;
        set(&mut a.accept_proxy, &raw.accept_proxy, |v| Ok(v.value))?;
        set(
            &mut a.proxy_header_timeout,
            &raw.proxy_header_timeout,
            |v| dur_positive(ctx, "proxy_header_timeout", v),
        )?;
        set(&mut a.allow, &raw.allow, |v| cidrs(ctx, "allow", v))?;
        set(&mut a.deny, &raw.deny, |v| cidrs(ctx, "deny", v))?;
        set(
            &mut a.max_conns_per_source,
            &raw.max_conns_per_source,
            |v| usize_in(ctx, "max_conns_per_source", v, 1, MAX_CONNS_LIMIT).map(Some),
        )?;
        set(&mut a.sni_required, &raw.sni_required, |v| Ok(v.value))?;
        if let Some(h) = &raw.health {
            s.health.layer(ctx, h)?;
        }
        Ok(s)
    }

    /// The finished app.
    fn into_app(
        self,
        name: &str,
        listen: Vec<SocketAddr>,
        targets: Vec<TargetConfig>,
        max_conns: Option<usize>,
    ) -> AppConfig {
        AppConfig {
            name: name.to_string(),
            listen,
            targets,
            max_conns,
            health: self.health.resolve(),
            ..self.app
        }
    }
}

impl HealthSettings {
    fn layer(&mut self, ctx: Ctx<'_>, h: &RawHealth) -> Result<(), ConfigError> {
        set(&mut self.interval, &h.interval, |v| {
            dur_or_off(ctx, "health.interval", v)
        })?;
        set(&mut self.timeout, &h.timeout, |v| {
            dur_positive(ctx, "health.timeout", v).map(Some)
        })?;
        set(&mut self.down_time, &h.down_time, |v| {
            dur_or_zero(ctx, "health.down_time", v)
        })?;
        set(&mut self.rise, &h.rise, |v| {
            u32_in(ctx, "health.rise", v, 1, 1000)
        })?;
        set(&mut self.fall, &h.fall, |v| {
            u32_in(ctx, "health.fall", v, 1, 1000)
        })?;
        Ok(())
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

// ---------------------------------------------------------------------------------------------
// Names.

/// Whether `name` is a valid app name: 1..=64 characters of `[A-Za-z0-9._-]` (safe in a
/// Prometheus label, a log line and HTML).
pub fn is_valid_app_name(name: &str) -> bool {
    (1..=MAX_APP_NAME).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Whether `name` is a valid target name (the target as written, e.g. `db1.internal:5432`,
/// `[::1]:80`): at most 255 characters of `[A-Za-z0-9._:[]%-]`.
pub fn is_valid_target_name(name: &str) -> bool {
    name.len() <= MAX_TARGET_NAME
        && name.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'[' | b']' | b'%' | b'-')
        })
}

/// The app's name: present, valid and not taken by an earlier app.
fn app_name<'a>(
    index: usize,
    app: &'a RawApp,
    earlier: &[AppConfig],
) -> Result<&'a str, ConfigError> {
    let err = |line, msg: String| ConfigError::new(line, None, Some(app.name_key), msg);
    let Some(name) = &app.name else {
        return Err(err(app.line, format!("app #{} has no name", index + 1)));
    };
    if name.value.trim().is_empty() {
        return Err(err(
            name.line,
            format!("app #{} has an empty name", index + 1),
        ));
    }
    if !is_valid_app_name(&name.value) {
        return Err(err(
            name.line,
            format!(
                "app name '{}' may only contain A-Z a-z 0-9 . _ - (1-{MAX_APP_NAME} characters)",
                escape_controls(&name.value)
            ),
        ));
    }
    if earlier.iter().any(|a| a.name == name.value) {
        return Err(ConfigError::new(
            name.line,
            Some(&name.value),
            Some(app.name_key),
            format!("duplicate app name '{}'", name.value),
        ));
    }
    Ok(&name.value)
}

// ---------------------------------------------------------------------------------------------
// Addresses.

/// Parse "ip:port" / "[v6]:port" for a listen entry, or a bare port (bound on 0.0.0.0).
/// Port 0 is allowed everywhere: any free port.
fn listen_addr(ctx: Ctx<'_>, l: &RawListenAt) -> Result<SocketAddr, ConfigError> {
    match &l.listen {
        RawListen::Port(p) => {
            let port = u16::try_from(*p).map_err(|_| {
                ctx.err(
                    l.line,
                    l.key,
                    format!("port {p} is out of range (0..=65535; 0 = any free port)"),
                )
            })?;
            Ok(SocketAddr::from(([0, 0, 0, 0], port)))
        }
        RawListen::Addr(s) => s.trim().parse().map_err(|_| {
            ctx.err(
                l.line,
                l.key,
                format!(
                    "'{}' is not an ip:port address (e.g. \"0.0.0.0:8080\" or \"[::]:8080\")",
                    escape_controls(s)
                ),
            )
        }),
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

/// Resolve `host` (an IP literal, brackets optional, or a name for the system resolver) with
/// `port`: a name gives its first IPv4 address if it has one, else its first address. The one
/// resolver of the crate's configuration: file targets and the command line both use it.
pub fn resolve_host(host: &str, port: u16) -> Result<SocketAddr, String> {
    let host = host.trim();
    let bare = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    if let Ok(ip) = bare.parse::<IpAddr>() {
        return Ok(SocketAddr::new(ip, port));
    }
    // Fuzz builds (`cargo fuzz` sets `--cfg fuzzing`) never ask the resolver: millions of
    // random names would become DNS queries.
    if cfg!(fuzzing) {
        return Err(format!(
            "cannot resolve host '{bare}': no DNS while fuzzing"
        ));
    }
    let addrs: Vec<SocketAddr> = (bare, port)
        .to_socket_addrs()
        .map_err(|e| format!("cannot resolve host '{bare}': {e}"))?
        .collect();
    addrs
        .iter()
        .find(|a| a.is_ipv4())
        .or_else(|| addrs.first())
        .copied()
        .ok_or_else(|| format!("cannot resolve host '{bare}': no addresses"))
}

/// Resolve a target "host:port" (see [`resolve_host`]); port 0 is refused.
fn target_addr(ctx: Ctx<'_>, t: &RawTarget) -> Result<SocketAddr, ConfigError> {
    let spec = t.spec.trim();
    let err = |msg: String| ctx.err(t.line, t.key, msg);
    if let Ok(addr) = spec.parse::<SocketAddr>() {
        if addr.port() == 0 {
            return Err(err(format!(
                "target '{spec}': port 0 is not allowed (1..=65535)"
            )));
        }
        return Ok(addr);
    }
    let (host, port) = split_host_port(spec).ok_or_else(|| {
        err(format!(
            "target '{spec}' is not host:port (IPv6 goes in brackets: \"[::1]:80\")"
        ))
    })?;
    let port: u16 = match port.trim().parse::<u16>() {
        Ok(p) if p != 0 => p,
        _ => {
            return Err(err(format!(
                "target '{spec}': port '{port}' is out of range (1..=65535)"
            )));
        }
    };
    if host.trim().is_empty() {
        return Err(err(format!("target '{spec}' has no host")));
    }
    resolve_host(host, port).map_err(err)
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

/// Every listen address of `apps`, with the name of its app.
fn listeners(apps: &[AppConfig]) -> impl Iterator<Item = (SocketAddr, &str)> {
    apps.iter()
        .flat_map(|a| a.listen.iter().map(move |l| (*l, a.name.as_str())))
}

/// A listener of `apps` that `addr` would collide with, if any.
fn listen_conflict(apps: &[AppConfig], addr: SocketAddr) -> Option<(SocketAddr, &str)> {
    listeners(apps).find(|(l, _)| listen_overlap(*l, addr))
}

// ---------------------------------------------------------------------------------------------
// Resolution.

/// Resolve and validate a raw document into a `Config` (no CLI overrides yet).
pub fn resolve(raw: RawDoc) -> Result<Config, ConfigError> {
    let mut cfg = resolve_globals(&raw.globals)?;
    let defaults = Settings::builtin().layer(DEFAULTS, &raw.defaults)?;
    if raw.apps.is_empty() {
        return Err(ConfigError::new(
            None,
            None,
            raw.apps_key,
            "no apps defined: at least one app is required",
        ));
    }
    for (index, app) in raw.apps.iter().enumerate() {
        let resolved = resolve_app(index, app, &defaults, &cfg.apps)?;
        cfg.apps.push(resolved);
    }
    check_loops(&cfg.apps, &raw.apps)?;
    check_admin(&cfg, raw.globals.admin_listen.as_ref().and_then(|a| a.line))?;
    Ok(cfg)
}

/// The process-wide settings (`[defaults]` minus the per-app keys, and `[admin]`); `apps` is
/// left empty.
fn resolve_globals(g: &RawGlobals) -> Result<Config, ConfigError> {
    let d = DEFAULTS;
    let mut cfg = Config::default();
    set(&mut cfg.workers, &g.workers, workers)?;
    set(&mut cfg.cpu_pin, &g.cpu_pin, |list| {
        list.value
            .iter()
            .map(|c| usize_in(d, "cpu_pin", c, 0, MAX_CPU as i64))
            .collect()
    })?;
    set(&mut cfg.max_conns, &g.max_conns, |v| {
        usize_in(d, "max_conns", v, 1, MAX_CONNS_LIMIT).map(Some)
    })?;
    set(&mut cfg.buffer_size, &g.buffer_size, |v| {
        let (min, max) = (MIN_BUFFER_SIZE as i64, MAX_BUFFER_SIZE as i64);
        usize_in(d, "buffer_size", v, min, max)
    })?;
    set(&mut cfg.max_events, &g.max_events, |v| {
        usize_in(d, "max_events", v, 1, MAX_EVENTS_LIMIT)
    })?;
    set(&mut cfg.backlog, &g.backlog, |v| {
        i32::try_from(int_in(d, "backlog", v, 1, MAX_BACKLOG)?)
            .map_err(|_| d.err(v.line, "backlog", "out of range"))
    })?;
    set(&mut cfg.grace, &g.grace_period, |v| {
        dur_or_zero(d, "grace_period", v)
    })?;
    set(&mut cfg.drain_delay, &g.drain_delay, |v| {
        dur_or_zero(d, "drain_delay", v)
    })?;
    set(&mut cfg.log_interval, &g.log_interval, |v| {
        dur_or_off(d, "log_interval", v)
    })?;
    set(
        &mut cfg.upgrade_migrate,
        &g.upgrade_migrate,
        |v| Ok(v.value),
    )?;
    set(&mut cfg.admin, &g.admin_listen, |v| admin_addr(v).map(Some))?;
    Ok(cfg)
}

/// `[admin] listen`: an "ip:port" address.
fn admin_addr(v: &At<String>) -> Result<SocketAddr, ConfigError> {
    let ctx = Ctx {
        app: None,
        prefix: "admin.",
    };
    v.value.trim().parse().map_err(|_| {
        let shown = escape_controls(&v.value);
        ctx.err(
            v.line,
            "listen",
            format!("'{shown}' is not an ip:port address"),
        )
    })
}

/// `workers`: 1..=MAX_WORKERS or "auto".
fn workers(w: &At<RawWorkers>) -> Result<Workers, ConfigError> {
    match &w.value {
        RawWorkers::Count(n) => {
            let n = usize_in(
                DEFAULTS,
                "workers",
                &At::new(*n, w.line),
                1,
                MAX_WORKERS as i64,
            )?;
            Ok(Workers::Count(n))
        }
        RawWorkers::Word(s) if s.trim().eq_ignore_ascii_case("auto") => Ok(Workers::Auto),
        RawWorkers::Word(s) => Err(DEFAULTS.err(
            w.line,
            "workers",
            format!(
                "'{}' is not a number of workers or \"auto\"",
                escape_controls(s)
            ),
        )),
    }
}

/// Resolve app number `index` (0-based) over the `[defaults]` settings; `earlier` are the apps
/// before it, for the unique-name and listener-overlap rules.
fn resolve_app(
    index: usize,
    app: &RawApp,
    defaults: &Settings,
    earlier: &[AppConfig],
) -> Result<AppConfig, ConfigError> {
    let name = app_name(index, app, earlier)?;
    let ctx = Ctx {
        app: Some(name),
        prefix: "",
    };
    let listen = app_listen(ctx, app, earlier)?;
    let targets = app_targets(ctx, app)?;
    let max_conns = match &app.max_conns {
        Some(v) => Some(usize_in(ctx, "max_conns", v, 1, MAX_CONNS_LIMIT)?),
        None => None,
    };
    let settings = defaults.layer(ctx, &app.settings)?;
    let mut cfg = settings.into_app(name, listen, targets, max_conns);
    cfg.routes = app_routes(ctx, app, cfg.balance)?;
    if cfg.sni_required && cfg.routes.is_empty() {
        let line = app.settings.sni_required.as_ref().and_then(|v| v.line);
        return Err(ctx.err(
            line,
            "sni_required",
            "needs routes (SNI routing is off without them)",
        ));
    }
    let all = cfg.all_targets().count();
    if all > MAX_TARGETS {
        return Err(ctx.err(
            app.line,
            "routes",
            format!("too many targets (at most {MAX_TARGETS})"),
        ));
    }
    Ok(cfg)
}

/// The app's SNI routes: each with at least one valid pattern (no pattern twice in the app)
/// and at least one target; `balance` is the app's unless the route says.
fn app_routes(
    ctx: Ctx<'_>,
    app: &RawApp,
    app_balance: Balance,
) -> Result<Vec<RouteConfig>, ConfigError> {
    let mut routes: Vec<RouteConfig> = Vec::with_capacity(app.routes.len());
    for r in &app.routes {
        if r.sni.is_empty() {
            return Err(ctx.err(r.line, "routes.sni", "must not be empty"));
        }
        let mut sni = Vec::with_capacity(r.sni.len());
        for p in &r.sni {
            let pat = sni_pattern(&p.value).ok_or_else(|| {
                ctx.err(
                    p.line,
                    "routes.sni",
                    format!(
                        "'{}' is not a server name or a wildcard such as \"*.example.com\"",
                        escape_controls(&p.value)
                    ),
                )
            })?;
            let seen = routes.iter().flat_map(|o| o.sni.iter()).chain(sni.iter());
            if seen.clone().any(|o| *o == pat) {
                return Err(ctx.err(p.line, "routes.sni", format!("'{pat}' is routed twice")));
            }
            sni.push(pat);
        }
        if r.targets.is_empty() {
            return Err(ctx.err(r.line, "routes.targets", "must not be empty"));
        }
        let targets = target_list(ctx, &r.targets)?;
        let balance = match &r.balance {
            Some(b) => balance(ctx, b)?,
            None => app_balance,
        };
        routes.push(RouteConfig {
            sni,
            targets,
            balance,
        });
    }
    Ok(routes)
}

/// A route pattern lower-cased without a trailing dot: a host name, or `*.` and a host name
/// with at least two labels. `None` if invalid.
fn sni_pattern(s: &str) -> Option<String> {
    let p = s.trim().trim_end_matches('.').to_ascii_lowercase();
    let host = p.strip_prefix("*.").unwrap_or(&p);
    let labels_ok = !host.is_empty()
        && host.len() <= 253
        && host.split('.').all(|l| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    let wildcard_ok = !p.starts_with("*.") || host.contains('.');
    (labels_ok && wildcard_ok).then_some(p)
}

/// The app's listen addresses: at least one, none colliding with another (this app's or an
/// earlier app's).
fn app_listen(
    ctx: Ctx<'_>,
    app: &RawApp,
    earlier: &[AppConfig],
) -> Result<Vec<SocketAddr>, ConfigError> {
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
    let mut listen: Vec<SocketAddr> = Vec::with_capacity(app.listen.len());
    for l in &app.listen {
        let addr = listen_addr(ctx, l)?;
        if let Some(other) = listen.iter().find(|b| listen_overlap(**b, addr)) {
            let msg = format!("{addr} is listed twice (overlaps {other})");
            return Err(ctx.err(l.line, l.key, msg));
        }
        if let Some((other, owner)) = listen_conflict(earlier, addr) {
            let msg = format!("{addr} is already used by app '{owner}' ({other})");
            return Err(ctx.err(l.line, l.key, msg));
        }
        listen.push(addr);
    }
    Ok(listen)
}

/// The app's targets: at least one, each with a valid name, resolved, no address twice.
fn app_targets(ctx: Ctx<'_>, app: &RawApp) -> Result<Vec<TargetConfig>, ConfigError> {
    if app.targets.is_empty() {
        return Err(ctx.err(
            app.targets_line.or(app.line),
            app.targets_key,
            "must not be empty",
        ));
    }
    target_list(ctx, &app.targets)
}

/// A non-empty list of targets: each with a valid name, resolved, no address twice.
fn target_list(ctx: Ctx<'_>, list: &[RawTarget]) -> Result<Vec<TargetConfig>, ConfigError> {
    if let Some(extra) = list.get(MAX_TARGETS) {
        return Err(ctx.err(
            extra.line,
            extra.key,
            format!("too many targets (at most {MAX_TARGETS})"),
        ));
    }
    let mut targets: Vec<TargetConfig> = Vec::with_capacity(list.len());
    for t in list {
        let name = t.spec.trim();
        if !is_valid_target_name(name) {
            return Err(ctx.err(
                t.line,
                t.key,
                format!(
                    "target '{}' may only contain A-Z a-z 0-9 . _ : [ ] % - (at most {MAX_TARGET_NAME} characters)",
                    escape_controls(name)
                ),
            ));
        }
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
                    "target '{name}' is listed twice (same address as '{}'; use weight instead)",
                    prev.name
                ),
            ));
        }
        targets.push(TargetConfig {
            name: name.to_string(),
            addr,
            weight,
        });
    }
    Ok(targets)
}

// ---------------------------------------------------------------------------------------------
// Cross-app checks.

/// A target that is one of our own listeners (any app's) would loop connections back into the
/// proxy. `raw` are the apps as written, in the same order as `apps` (for lines and keys).
fn check_loops(apps: &[AppConfig], raw: &[RawApp]) -> Result<(), ConfigError> {
    for (app, raw_app) in apps.iter().zip(raw) {
        let route_targets = app.routes.iter().flat_map(|r| r.targets.iter());
        let raw_route_targets = raw_app.routes.iter().flat_map(|r| r.targets.iter());
        let all = app.targets.iter().chain(route_targets);
        for (t, raw_t) in all.zip(raw_app.targets.iter().chain(raw_route_targets)) {
            if let Some((l, owner)) = listeners(apps).find(|(l, _)| is_own_listener(t.addr, *l)) {
                return Err(ConfigError::new(
                    raw_t.line,
                    Some(&app.name),
                    Some(raw_t.key),
                    format!(
                        "target '{}' is this proxy's own listen address {l} (app '{owner}'): it would loop",
                        t.name
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// The admin listener must not collide with an app's listener. `line` is where
/// `[admin] listen` is written.
fn check_admin(cfg: &Config, line: Option<usize>) -> Result<(), ConfigError> {
    let Some(admin) = cfg.admin else {
        return Ok(());
    };
    match listen_conflict(&cfg.apps, admin) {
        Some((l, owner)) => Err(ConfigError::new(
            line,
            None,
            Some("admin.listen"),
            format!("{admin} overlaps listen address {l} of app '{owner}'"),
        )),
        None => Ok(()),
    }
}

// ---------------------------------------------------------------------------------------------
// Command-line overrides.

/// Apply command-line overrides (they win over everything in the file) and check the values
/// that came from the command line. Usable for a CLI-only config too.
pub fn apply_overrides(cfg: &mut Config, ov: &Overrides) -> Result<(), ConfigError> {
    check_overrides(&cfg.apps, ov)?;
    override_globals(cfg, ov);
    for app in &mut cfg.apps {
        override_app(app, ov);
    }
    Ok(())
}

/// The rules for values that came from the command line (clap checks most of them already;
/// this holds for embedders too): the same limits as in a file.
fn check_overrides(apps: &[AppConfig], ov: &Overrides) -> Result<(), ConfigError> {
    let bad = |key: &str, msg: String| {
        Err(ConfigError::new(
            None,
            None,
            Some(key),
            format!("{msg} (from the command line)"),
        ))
    };
    let at_least_one = |key: &str, n: Option<usize>| match n {
        Some(0) => bad(key, "must be at least 1".into()),
        _ => Ok(()),
    };
    if let Some(Workers::Count(n)) = ov.workers
        && !(1..=MAX_WORKERS).contains(&n)
    {
        return bad(
            "workers",
            format!("{n} is out of range (1..={MAX_WORKERS})"),
        );
    }
    if let Some(cpu) = ov.cpu_pin.iter().flatten().find(|&&c| c > MAX_CPU) {
        return bad(
            "cpu_pin",
            format!("CPU {cpu} is out of range (0..={MAX_CPU})"),
        );
    }
    at_least_one("max_conns", ov.max_conns)?;
    if let Some(b) = ov.buffer_size
        && !(MIN_BUFFER_SIZE..=MAX_BUFFER_SIZE).contains(&b)
    {
        return bad(
            "buffer_size",
            format!("{b} is out of range ({MIN_BUFFER_SIZE}..={MAX_BUFFER_SIZE})"),
        );
    }
    at_least_one("max_events", ov.max_events)?;
    if ov.backlog.is_some_and(|b| b < 1) {
        return bad("backlog", "must be at least 1".into());
    }
    if let Some(a) = ov.admin
        && let Some((l, owner)) = listen_conflict(apps, a)
    {
        return bad(
            "admin",
            format!("{a} overlaps listen address {l} of app '{owner}'"),
        );
    }
    if ov.connect_timeout.is_some_and(|t| t.is_zero()) {
        return bad("connect_timeout", "must be greater than 0".into());
    }
    Ok(())
}

/// The process-wide overrides (already checked).
fn override_globals(cfg: &mut Config, ov: &Overrides) {
    if let Some(w) = ov.workers {
        cfg.workers = w;
    }
    if let Some(c) = &ov.cpu_pin {
        cfg.cpu_pin = c.clone();
    }
    if let Some(m) = ov.max_conns {
        cfg.max_conns = Some(m);
    }
    if let Some(b) = ov.buffer_size {
        cfg.buffer_size = b;
    }
    if let Some(e) = ov.max_events {
        cfg.max_events = e;
    }
    if let Some(b) = ov.backlog {
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
}

/// The per-app overrides (already checked), for every app alike.
fn override_app(app: &mut AppConfig, ov: &Overrides) {
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
        // --splice: always; --no-splice: never (not even adaptively).
        app.splice = s;
        app.splice_auto = false;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{DEFAULT_CONNECT_TIMEOUT, load_file, load_str};
    use std::path::Path;

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

    #[test]
    fn app_names_must_be_label_safe() {
        let named = |name: &str| {
            load_str(
                &format!("[[app]]\nname = {name}\nports = [0]\ntargets = [\"127.0.0.1:1\"]\n"),
                "cfg.toml",
                &Overrides::default(),
            )
            .map(|c| c.apps[0].name.clone())
            .map_err(|e| e.to_string())
        };
        let long = "x".repeat(MAX_APP_NAME);
        for good in [
            "web",
            "five-thousand",
            "port-17001",
            "a.b_c-D9",
            long.as_str(),
        ] {
            assert_eq!(named(&format!("\"{good}\"")).as_deref(), Ok(good));
        }
        let e = named("\"a\\nb\"").expect_err("newline");
        assert_eq!(
            e,
            "cfg.toml:2: key 'name': app name 'a\\nb' may only contain A-Z a-z 0-9 . _ - (1-64 characters)"
        );
        let too_long = format!("\"{long}x\"");
        for bad in [
            "\"a b\"",
            "\" web\"",
            "\"<b>\"",
            "\"é\"",
            "\"a\\u0007\"",
            "\"a/b\"",
            too_long.as_str(),
        ] {
            let e = named(bad).expect_err(bad);
            assert!(
                e.starts_with("cfg.toml:2: key 'name': app name '"),
                "{bad}: {e}"
            );
            assert!(!e.contains('\n') && !e.contains('\u{7}'), "{bad}: {e}");
        }
    }

    #[test]
    fn target_names_must_be_label_safe() {
        let t = |target: &str| {
            load_str(
                &format!("[[app]]\nname = \"a\"\nports = [0]\ntargets = [{target}]\n"),
                "cfg.toml",
                &Overrides::default(),
            )
            .map(|c| c.apps[0].targets[0].name.clone())
            .map_err(|e| e.to_string())
        };
        for good in [
            "127.0.0.1:8081",
            "[::1]:80",
            "localhost:80",
            "[fe80::1%1]:80",
        ] {
            assert_eq!(t(&format!("\"{good}\"")).as_deref(), Ok(good), "{good}");
        }
        let e = t("\"local\\nhost:80\"").expect_err("newline");
        assert!(
            e.starts_with(
                "cfg.toml:4: app 'a': key 'targets': target 'local\\nhost:80' may only contain"
            ),
            "{e}"
        );
        let long = format!("\"{}.example:80\"", "a".repeat(MAX_TARGET_NAME));
        for bad in ["\"<b>:80\"", "\"a b:80\"", "\"h\\\"x:80\"", long.as_str()] {
            let e = t(bad).expect_err(bad);
            assert!(
                e.starts_with("cfg.toml:4: app 'a': key 'targets': target '"),
                "{bad}: {e}"
            );
            assert!(e.contains("may only contain"), "{bad}: {e}");
        }
    }

    #[test]
    fn name_predicates() {
        assert!(is_valid_app_name("default"));
        assert!(!is_valid_app_name(""));
        assert!(!is_valid_app_name("a\nb"));
        assert!(is_valid_target_name("db1.internal:5432"));
        assert!(!is_valid_target_name("a\nb:1"));
        assert!(!is_valid_target_name(&"a".repeat(MAX_TARGET_NAME + 1)));
    }
}
