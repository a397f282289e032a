//! The native TOML format: a serde mirror of the file (every field `Spanned`, so that each
//! later error can name its line) and its conversion into the format-neutral
//! [`RawDoc`]. Unknown keys and wrong types are errors here, with the
//! line, app and key recovered from the parser's byte span. This module never resolves host
//! names, applies defaults or validates values: `resolve.rs` does.

use std::fmt;

use serde::Deserialize;
use serde::de::{self, MapAccess, Visitor};
use toml::Spanned;

use super::error::ConfigError;
use super::raw::{
    At, RawApp, RawAppSettings, RawDoc, RawGlobals, RawHealth, RawListen, RawListenAt, RawRoute,
    RawTarget, RawWorkers, line_of,
};

/// The whole file.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub defaults: Option<Defaults>,
    pub admin: Option<Admin>,
    #[serde(default)]
    pub app: Vec<Spanned<AppFile>>,
}

/// `[defaults]`: process-wide settings and defaults for every app. The per-app keys here and in
/// [`AppFile`] are the same (serde cannot flatten `Spanned` fields under `deny_unknown_fields`);
/// `app_settings!` copies them.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Defaults {
    pub workers: Option<Spanned<WorkersFile>>,
    pub cpu_pin: Option<Spanned<Vec<Spanned<i64>>>>,
    pub max_conns: Option<Spanned<i64>>,
    pub buffer_size: Option<Spanned<i64>>,
    pub max_events: Option<Spanned<i64>>,
    pub backlog: Option<Spanned<i64>>,
    pub connect_timeout: Option<Spanned<DurationText>>,
    pub idle_timeout: Option<Spanned<DurationText>>,
    pub grace_period: Option<Spanned<DurationText>>,
    pub drain_delay: Option<Spanned<DurationText>>,
    pub log_interval: Option<Spanned<DurationText>>,
    pub upgrade_migrate: Option<Spanned<bool>>,
    pub balance: Option<Spanned<String>>,
    pub retries: Option<Spanned<i64>>,
    pub access_log: Option<Spanned<bool>>,
    pub splice: Option<Spanned<SpliceFile>>,
    pub health: Option<HealthFile>,
    pub send_proxy: Option<Spanned<String>>,
    pub accept_proxy: Option<Spanned<bool>>,
    pub proxy_header_timeout: Option<Spanned<DurationText>>,
    pub allow: Option<Spanned<Vec<Spanned<String>>>>,
    pub deny: Option<Spanned<Vec<Spanned<String>>>>,
    pub max_conns_per_source: Option<Spanned<i64>>,
    pub sni_required: Option<Spanned<bool>>,
}

/// `[admin]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Admin {
    pub listen: Spanned<String>,
}

/// One `[[app]]`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AppFile {
    pub name: Option<Spanned<String>>,
    pub listen: Option<Spanned<Vec<Spanned<String>>>>,
    pub ports: Option<Spanned<Vec<Spanned<i64>>>>,
    pub targets: Option<Spanned<Vec<Spanned<TargetFile>>>>,
    pub max_conns: Option<Spanned<i64>>,
    pub connect_timeout: Option<Spanned<DurationText>>,
    pub idle_timeout: Option<Spanned<DurationText>>,
    pub balance: Option<Spanned<String>>,
    pub retries: Option<Spanned<i64>>,
    pub access_log: Option<Spanned<bool>>,
    pub splice: Option<Spanned<SpliceFile>>,
    pub health: Option<HealthFile>,
    pub send_proxy: Option<Spanned<String>>,
    pub accept_proxy: Option<Spanned<bool>>,
    pub proxy_header_timeout: Option<Spanned<DurationText>>,
    pub allow: Option<Spanned<Vec<Spanned<String>>>>,
    pub deny: Option<Spanned<Vec<Spanned<String>>>>,
    pub max_conns_per_source: Option<Spanned<i64>>,
    pub sni_required: Option<Spanned<bool>>,
    /// SNI routes: `routes = [{ sni = [...], targets = [...], balance = "..." }]`.
    pub routes: Option<Vec<Spanned<RouteFile>>>,
}

/// One SNI route of an app.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteFile {
    pub sni: Spanned<Vec<Spanned<String>>>,
    pub targets: Spanned<Vec<Spanned<TargetFile>>>,
    pub balance: Option<Spanned<String>>,
}

/// `[app.health]` / `[defaults.health]`. Active checks run when `interval` is set.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HealthFile {
    pub interval: Option<Spanned<DurationText>>,
    pub timeout: Option<Spanned<DurationText>>,
    pub rise: Option<Spanned<i64>>,
    pub fall: Option<Spanned<i64>>,
    pub down_time: Option<Spanned<DurationText>>,
}

/// A duration string ("250ms", "5s", "off"); a bare TOML number is a type error, because its
/// unit would be a guess.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DurationText(pub String);

impl<'de> Deserialize<'de> for DurationText {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = DurationText;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a duration string such as \"250ms\", \"5s\", \"10m\" or \"off\"")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DurationText, E> {
                Ok(DurationText(v.to_string()))
            }
        }
        d.deserialize_str(V)
    }
}

/// `splice`: a boolean or a string ("auto").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SpliceFile {
    Bool(bool),
    Word(String),
}

impl<'de> Deserialize<'de> for SpliceFile {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = SpliceFile;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("true, false or \"auto\"")
            }
            fn visit_bool<E: de::Error>(self, v: bool) -> Result<SpliceFile, E> {
                Ok(SpliceFile::Bool(v))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<SpliceFile, E> {
                Ok(SpliceFile::Word(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// `workers`: an integer or a string ("auto").
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WorkersFile {
    Count(i64),
    Word(String),
}

impl<'de> Deserialize<'de> for WorkersFile {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = WorkersFile;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a number of workers or \"auto\"")
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<WorkersFile, E> {
                Ok(WorkersFile::Count(v))
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<WorkersFile, E> {
                Ok(WorkersFile::Count(i64::try_from(v).unwrap_or(i64::MAX)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<WorkersFile, E> {
                Ok(WorkersFile::Word(v.to_string()))
            }
        }
        d.deserialize_any(V)
    }
}

/// One target: `"host:port"` or `{ addr = "host:port", weight = 3 }`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetFile {
    Addr(String),
    Weighted { addr: String, weight: Option<i64> },
}

impl<'de> Deserialize<'de> for TargetFile {
    fn deserialize<D: de::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = TargetFile;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("\"host:port\" or { addr = \"host:port\", weight = N }")
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<TargetFile, E> {
                Ok(TargetFile::Addr(v.to_string()))
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<TargetFile, A::Error> {
                let mut addr: Option<String> = None;
                let mut weight: Option<i64> = None;
                while let Some(key) = map.next_key::<String>()? {
                    match key.as_str() {
                        "addr" => addr = Some(map.next_value()?),
                        "weight" => weight = Some(map.next_value()?),
                        other => {
                            return Err(de::Error::unknown_field(other, &["addr", "weight"]));
                        }
                    }
                }
                let addr = addr.ok_or_else(|| de::Error::missing_field("addr"))?;
                Ok(TargetFile::Weighted { addr, weight })
            }
        }
        d.deserialize_any(V)
    }
}

fn at<T: Clone>(text: &str, s: &Spanned<T>) -> At<T> {
    At::new(s.get_ref().clone(), Some(line_of(text, s.span().start)))
}

fn at_dur(text: &str, s: &Spanned<DurationText>) -> At<String> {
    At::new(s.get_ref().0.clone(), Some(line_of(text, s.span().start)))
}

fn at_list(text: &str, s: &Spanned<Vec<Spanned<String>>>) -> At<Vec<At<String>>> {
    At::new(
        s.get_ref().iter().map(|x| at(text, x)).collect(),
        Some(line_of(text, s.span().start)),
    )
}

/// Targets as written under `key`.
fn raw_targets(text: &str, list: &[Spanned<TargetFile>], key: &'static str) -> Vec<RawTarget> {
    list.iter()
        .map(|s| {
            let line = Some(line_of(text, s.span().start));
            match s.get_ref() {
                TargetFile::Addr(spec) => RawTarget {
                    spec: spec.clone(),
                    weight: None,
                    key,
                    line,
                },
                TargetFile::Weighted { addr, weight } => RawTarget {
                    spec: addr.clone(),
                    weight: weight.map(|w| At::new(w, line)),
                    key,
                    line,
                },
            }
        })
        .collect()
}

fn health(text: &str, h: &HealthFile) -> RawHealth {
    RawHealth {
        interval: h.interval.as_ref().map(|v| at_dur(text, v)),
        timeout: h.timeout.as_ref().map(|v| at_dur(text, v)),
        down_time: h.down_time.as_ref().map(|v| at_dur(text, v)),
        rise: h.rise.as_ref().map(|v| at(text, v)),
        fall: h.fall.as_ref().map(|v| at(text, v)),
    }
}

/// The per-app settings of `$src` (a `Defaults` or an `AppFile`: both carry the same fields
/// under the same names) as a `RawAppSettings`. One line per per-app key.
macro_rules! app_settings {
    ($text:expr, $src:expr) => {{
        let (text, s) = ($text, $src);
        RawAppSettings {
            connect_timeout: s.connect_timeout.as_ref().map(|v| at_dur(text, v)),
            idle_timeout: s.idle_timeout.as_ref().map(|v| at_dur(text, v)),
            balance: s.balance.as_ref().map(|v| at(text, v)),
            retries: s.retries.as_ref().map(|v| at(text, v)),
            access_log: s.access_log.as_ref().map(|v| at(text, v)),
            splice: s.splice.as_ref().map(|v| {
                let raw = match v.get_ref() {
                    SpliceFile::Bool(b) => crate::config::raw::RawSplice::Bool(*b),
                    SpliceFile::Word(w) => crate::config::raw::RawSplice::Word(w.clone()),
                };
                At::new(raw, Some(line_of(text, v.span().start)))
            }),
            health: s.health.as_ref().map(|h| health(text, h)),
            send_proxy: s.send_proxy.as_ref().map(|v| at(text, v)),
            accept_proxy: s.accept_proxy.as_ref().map(|v| at(text, v)),
            proxy_header_timeout: s.proxy_header_timeout.as_ref().map(|v| at_dur(text, v)),
            allow: s.allow.as_ref().map(|v| at_list(text, v)),
            deny: s.deny.as_ref().map(|v| at_list(text, v)),
            max_conns_per_source: s.max_conns_per_source.as_ref().map(|v| at(text, v)),
            sni_required: s.sni_required.as_ref().map(|v| at(text, v)),
        }
    }};
}

/// Parse TOML text into the format-neutral document.
pub fn parse(text: &str) -> Result<RawDoc, ConfigError> {
    let file: FileConfig = toml::from_str(text).map_err(|e| toml_error(text, &e))?;
    Ok(to_raw(text, &file))
}

fn to_raw(text: &str, file: &FileConfig) -> RawDoc {
    let mut doc = RawDoc {
        apps_key: Some("app"),
        ..RawDoc::default()
    };
    if let Some(d) = &file.defaults {
        doc.globals = RawGlobals {
            workers: d.workers.as_ref().map(|w| {
                let v = match w.get_ref() {
                    WorkersFile::Count(n) => RawWorkers::Count(*n),
                    WorkersFile::Word(s) => RawWorkers::Word(s.clone()),
                };
                At::new(v, Some(line_of(text, w.span().start)))
            }),
            cpu_pin: d.cpu_pin.as_ref().map(|c| {
                At::new(
                    c.get_ref().iter().map(|x| at(text, x)).collect(),
                    Some(line_of(text, c.span().start)),
                )
            }),
            max_conns: d.max_conns.as_ref().map(|v| at(text, v)),
            buffer_size: d.buffer_size.as_ref().map(|v| at(text, v)),
            max_events: d.max_events.as_ref().map(|v| at(text, v)),
            backlog: d.backlog.as_ref().map(|v| at(text, v)),
            grace_period: d.grace_period.as_ref().map(|v| at_dur(text, v)),
            drain_delay: d.drain_delay.as_ref().map(|v| at_dur(text, v)),
            log_interval: d.log_interval.as_ref().map(|v| at_dur(text, v)),
            upgrade_migrate: d.upgrade_migrate.as_ref().map(|v| at(text, v)),
            admin_listen: None,
        };
        doc.defaults = app_settings!(text, d);
    }
    if let Some(a) = &file.admin {
        doc.globals.admin_listen = Some(at(text, &a.listen));
    }
    for sp in &file.app {
        let a = sp.get_ref();
        let mut listen = Vec::new();
        if let Some(l) = &a.listen {
            for s in l.get_ref() {
                listen.push(RawListenAt {
                    listen: RawListen::Addr(s.get_ref().clone()),
                    key: "listen",
                    line: Some(line_of(text, s.span().start)),
                });
            }
        }
        if let Some(p) = &a.ports {
            for n in p.get_ref() {
                listen.push(RawListenAt {
                    listen: RawListen::Port(*n.get_ref()),
                    key: "ports",
                    line: Some(line_of(text, n.span().start)),
                });
            }
        }
        let targets = a
            .targets
            .as_ref()
            .map(|t| raw_targets(text, t.get_ref(), "targets"))
            .unwrap_or_default();
        let routes = a
            .routes
            .iter()
            .flatten()
            .map(|r| RawRoute {
                line: Some(line_of(text, r.span().start)),
                sni: r
                    .get_ref()
                    .sni
                    .get_ref()
                    .iter()
                    .map(|n| at(text, n))
                    .collect(),
                targets: raw_targets(text, r.get_ref().targets.get_ref(), "routes.targets"),
                balance: r.get_ref().balance.as_ref().map(|b| at(text, b)),
            })
            .collect();
        let app_line = Some(line_of(text, sp.span().start));
        doc.apps.push(RawApp {
            line: app_line,
            name_key: "name",
            name: a.name.as_ref().map(|v| at(text, v)),
            listen_key: if a.listen.is_none() && a.ports.is_some() {
                "ports"
            } else {
                "listen"
            },
            listen_line: a
                .listen
                .as_ref()
                .map(|l| line_of(text, l.span().start))
                .or_else(|| a.ports.as_ref().map(|p| line_of(text, p.span().start))),
            listen,
            targets_key: "targets",
            targets_line: a.targets.as_ref().map(|t| line_of(text, t.span().start)),
            targets,
            max_conns: a.max_conns.as_ref().map(|v| at(text, v)),
            settings: app_settings!(text, a),
            routes,
        });
    }
    doc
}

/// Turn a TOML parse/type error into a one-line `ConfigError`: the line from the span, the key
/// from the text there, the app from the `[[app]]` section the span falls in.
fn toml_error(text: &str, e: &toml::de::Error) -> ConfigError {
    let message = e
        .message()
        .trim()
        .replace("expected i64", "expected an integer");
    let Some(span) = e.span() else {
        return ConfigError::new(None, None, None, message);
    };
    let start = span.start.min(text.len());
    let line = line_of(text, start);
    let spanned = text.get(start..span.end.min(text.len())).unwrap_or("");
    let near = key_near(text, start);
    let quoted = |prefix: &str| {
        message
            .strip_prefix(prefix)
            .and_then(|rest| rest.split('`').next())
            .map(str::to_string)
    };
    let key = if message.starts_with("unknown field") || message.starts_with("duplicate key") {
        let k = spanned
            .trim()
            .trim_matches(|c| c == '"' || c == '\'' || c == '[' || c == ']');
        if k.is_empty() || k.contains('\n') {
            quoted("unknown field `").or(near.map(Near::into_key))
        } else {
            Some(k.to_string())
        }
    } else if let Some(field) = quoted("missing field `") {
        // Reported at the table that lacks it.
        match near {
            Some(Near::Header(table)) => Some(format!("{table}.{field}")),
            _ => Some(field),
        }
    } else {
        near.map(Near::into_key)
    };
    let message = if key.as_deref() == Some("app") && message.contains("expected a sequence") {
        format!("{message} (apps are an array of tables: write [[app]])")
    } else {
        message
    };
    let app = app_at(text, start);
    ConfigError::new(Some(line), app.as_deref(), key.as_deref(), message)
}

/// What names the place of an error: a `key = value` or a `[table]` header.
enum Near {
    Key(String),
    Header(String),
}

impl Near {
    fn into_key(self) -> String {
        match self {
            Near::Key(k) | Near::Header(k) => k,
        }
    }
}

/// The `key = value` nearest before `offset` (on its line or above, within the same table),
/// or the header of the table it is in (or that starts on its line).
fn key_near(text: &str, offset: usize) -> Option<Near> {
    let head = text.get(..offset)?;
    let line_start = head.rfind('\n').map_or(0, |i| i + 1);
    let line_end = text[offset..].find('\n').map_or(text.len(), |i| offset + i);
    let whole = &text[line_start..line_end];
    // A header line counts whole; otherwise the part of the line before the offset, then the
    // lines above, nearest first.
    let current = if whole.trim_start().starts_with('[') {
        whole
    } else {
        &head[line_start..]
    };
    let above = head[..line_start].lines().rev();
    for l in std::iter::once(current).chain(above) {
        let t = l.trim_start();
        if t.starts_with('[') {
            let name = t.trim_start_matches('[').split(']').next()?.trim();
            return Some(Near::Header(name.to_string()));
        }
        if t.starts_with('#') {
            continue;
        }
        if let Some((k, _)) = t.split_once('=') {
            let k = k.trim();
            if !k.is_empty()
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.')
            {
                return Some(Near::Key(k.to_string()));
            }
        }
    }
    None
}

/// The name of the `[[app]]` whose section holds `offset`, if any.
fn app_at(text: &str, offset: usize) -> Option<String> {
    let mut index: Option<usize> = None;
    let mut pos = 0;
    for l in text.split_inclusive('\n') {
        if pos > offset {
            break;
        }
        let t = l.trim();
        if t.starts_with("[[") {
            let name = t
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim();
            if name == "app" {
                index = Some(index.map_or(0, |i| i + 1));
            }
        } else if t.starts_with('[') {
            let name = t
                .trim_start_matches('[')
                .split(']')
                .next()
                .unwrap_or("")
                .trim();
            if !name.starts_with("app.") {
                index = None;
            }
        }
        pos += l.len();
    }
    let index = index?;
    // The file may not deserialize, but it may still be valid TOML: read the name from it.
    let table: toml::Table = toml::from_str(text).ok()?;
    let app = table.get("app")?.as_array()?.get(index)?;
    app.get("name")?.as_str().map(str::to_string)
}

#[cfg(test)]
mod tests {
    use super::super::{Balance, Workers};
    use super::super::{Overrides, load_str};
    use std::time::Duration;

    fn load(text: &str) -> Result<super::super::Config, super::ConfigError> {
        load_str(text, "t.toml", &Overrides::default())
    }

    fn err(text: &str) -> String {
        match load(text) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn full_file_parses_every_key() {
        let text = r#"
[defaults]
workers = "auto"
cpu_pin = [0, 1]
max_conns = 500
buffer_size = 16384
max_events = 256
backlog = 128
connect_timeout = "2s"
idle_timeout = "5m"
grace_period = "10s"
drain_delay = "100ms"
log_interval = "off"
balance = "least-conn"
retries = 1
access_log = true
splice = false

[defaults.health]
fall = 5
down_time = "20s"

[admin]
listen = "127.0.0.1:9090"

[[app]]
name = "web"
listen = ["127.0.0.1:8080", "[::1]:8080"]
ports = [18080]
targets = ["127.0.0.1:8081", { addr = "127.0.0.1:8082", weight = 3 }, "[::1]:8083"]
max_conns = 10
connect_timeout = "250ms"
idle_timeout = "off"
balance = "source-hash"
access_log = false
splice = true
[app.health]
interval = "2s"
timeout = "500ms"
rise = 2
fall = 3

[[app]]
name = "db"
ports = [15432]
targets = ["localhost:5432"]
"#;
        let c = load(text).expect("loads");
        assert_eq!(c.workers, Workers::Auto);
        assert_eq!(c.cpu_pin, vec![0, 1]);
        assert_eq!(c.max_conns, Some(500));
        assert_eq!(c.buffer_size, 16384);
        assert_eq!(c.max_events, 256);
        assert_eq!(c.backlog, 128);
        assert_eq!(c.grace, Duration::from_secs(10));
        assert_eq!(c.drain_delay, Duration::from_millis(100));
        assert_eq!(c.log_interval, None);
        assert_eq!(c.admin, Some("127.0.0.1:9090".parse().unwrap()));
        assert_eq!(c.apps.len(), 2);
        let web = &c.apps[0];
        assert_eq!(web.name, "web");
        assert_eq!(web.listen.len(), 3);
        assert_eq!(web.listen[1], "[::1]:8080".parse().unwrap());
        assert_eq!(web.listen[2], "0.0.0.0:18080".parse().unwrap());
        assert_eq!(web.targets.len(), 3);
        assert_eq!(web.targets[1].weight, 3);
        assert_eq!(web.targets[1].name, "127.0.0.1:8082");
        assert_eq!(web.balance, Balance::SourceHash);
        assert_eq!(web.max_conns, Some(10));
        assert_eq!(web.connect_timeout, Duration::from_millis(250));
        assert_eq!(web.idle_timeout, None);
        assert_eq!(web.retries, Some(1));
        assert!(!web.access_log);
        assert!(web.splice);
        let active = web.health.active.expect("active checks");
        assert_eq!(active.interval, Duration::from_secs(2));
        assert_eq!(active.timeout, Duration::from_millis(500));
        assert_eq!((active.rise, active.fall), (2, 3));
        assert_eq!(web.health.fall, 3);
        assert_eq!(web.health.down_time, Duration::from_secs(20));
        let db = &c.apps[1];
        assert_eq!(db.balance, Balance::LeastConn);
        assert_eq!(db.connect_timeout, Duration::from_secs(2));
        assert_eq!(db.idle_timeout, Some(Duration::from_secs(300)));
        assert!(db.access_log);
        assert_eq!(db.health.fall, 5);
        assert!(db.health.active.is_none());
        assert_eq!(db.targets[0].addr.port(), 5432);
        assert!(db.targets[0].addr.ip().is_loopback());
    }

    #[test]
    fn minimal_file_gets_builtin_defaults() {
        let c = load("[[app]]\nname = \"a\"\nports = [9000]\ntargets = [\"127.0.0.1:9001\"]\n")
            .expect("loads");
        let d = super::super::Config::default();
        assert_eq!(c.workers, d.workers);
        assert_eq!(c.buffer_size, d.buffer_size);
        assert_eq!(c.max_conns, None);
        let a = &c.apps[0];
        assert_eq!(a.connect_timeout, super::super::DEFAULT_CONNECT_TIMEOUT);
        assert_eq!(a.balance, Balance::RoundRobin);
        assert_eq!(a.health, super::super::HealthConfig::default());
        assert_eq!(a.retries, None);
    }

    #[test]
    fn unknown_key_names_line_app_and_key() {
        let e = err(
            "[[app]]\nname = \"web\"\nports = [9000]\ntargets = [\"127.0.0.1:1\"]\nmax_con = 3\n",
        );
        assert!(e.starts_with("t.toml:5: app 'web': key 'max_con': "), "{e}");
        let e = err("[defaults]\nworkerz = 2\n");
        assert!(e.starts_with("t.toml:2: key 'workerz': "), "{e}");
    }

    #[test]
    fn unknown_key_in_health_and_target_table() {
        let e = err(
            "[[app]]\nname = \"web\"\nports = [9000]\ntargets = [\"127.0.0.1:1\"]\n[app.health]\nintervall = \"1s\"\n",
        );
        assert!(e.starts_with("t.toml:6: app 'web': key 'intervall'"), "{e}");
        let e = err(
            "[[app]]\nname = \"web\"\nports = [9000]\ntargets = [{ addr = \"127.0.0.1:1\", wieght = 2 }]\n",
        );
        assert!(e.contains("t.toml:4: app 'web'"), "{e}");
        assert!(e.contains("wieght"), "{e}");
    }

    #[test]
    fn wrong_type_names_the_key() {
        let e = err("[[app]]\nname = \"web\"\nports = [\"9000\"]\ntargets = [\"127.0.0.1:1\"]\n");
        assert!(e.starts_with("t.toml:3: app 'web': key 'ports': "), "{e}");
        let e = err(
            "[[app]]\nname = \"web\"\nports = [9000]\ntargets = [\"127.0.0.1:1\"]\nconnect_timeout = 5\n",
        );
        assert!(
            e.starts_with("t.toml:5: app 'web': key 'connect_timeout': "),
            "{e}"
        );
        assert!(e.contains("duration"), "{e}");
    }

    #[test]
    fn syntax_error_has_a_line() {
        let e = err("[[app]]\nname = \"web\nports = [9000]\n");
        assert!(e.starts_with("t.toml:2"), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn semantic_errors_carry_lines() {
        let base = "[[app]]\nname = \"web\"\nports = [9000]\n";
        let e = err(&format!("{base}targets = []\n"));
        assert_eq!(e, "t.toml:4: app 'web': key 'targets': must not be empty");
        let e = err(&format!(
            "{base}targets = [\"127.0.0.1:1\"]\nidle_timeout = \"5 parsecs\"\n"
        ));
        assert!(
            e.starts_with("t.toml:5: app 'web': key 'idle_timeout': "),
            "{e}"
        );
        let e = err("[[app]]\nname = \"web\"\nports = [70000]\ntargets = [\"127.0.0.1:1\"]\n");
        assert!(e.starts_with("t.toml:3: app 'web': key 'ports': "), "{e}");
        let e = err(&format!(
            "{base}targets = [\"127.0.0.1:1\"]\n\n[[app]]\nname = \"web\"\nports = [9001]\ntargets = [\"127.0.0.1:1\"]\n"
        ));
        assert!(
            e.starts_with("t.toml:7: app 'web': key 'name': duplicate"),
            "{e}"
        );
        let e = err(&format!(
            "{base}targets = [\"127.0.0.1:1\"]\n[[app]]\nname = \"b\"\nlisten = [\"0.0.0.0:9000\"]\ntargets = [\"127.0.0.1:1\"]\n"
        ));
        assert!(e.starts_with("t.toml:7: app 'b': key 'listen': "), "{e}");
        let e = err("[[app]]\nports = [9000]\ntargets = [\"127.0.0.1:1\"]\n");
        assert!(e.starts_with("t.toml:1: key 'name': "), "{e}");
        let e = err(&format!(
            "{base}targets = [\n  \"127.0.0.1:1\",\n  {{ addr = \"127.0.0.1:2\", weight = 0 }},\n]\n"
        ));
        assert!(e.starts_with("t.toml:6: app 'web': key 'weight': "), "{e}");
        let e = err(&format!(
            "{base}targets = [\"127.0.0.1:1\"]\n[app.health]\nrise = 0\n"
        ));
        assert!(
            e.starts_with("t.toml:6: app 'web': key 'health.rise': "),
            "{e}"
        );
        let e = err(
            "[defaults]\nbuffer_size = 512\n[[app]]\nname = \"a\"\nports = [1]\ntargets = [\"127.0.0.1:2\"]\n",
        );
        assert!(
            e.starts_with("t.toml:2: key 'defaults.buffer_size': "),
            "{e}"
        );
        let e = err(&format!(
            "{base}targets = [\"127.0.0.1:1\"]\nbalance = \"fastest\"\n"
        ));
        assert!(e.starts_with("t.toml:5: app 'web': key 'balance': "), "{e}");
    }

    #[test]
    fn no_apps_is_an_error() {
        let e = err("[defaults]\nworkers = 1\n");
        assert!(e.contains("key 'app'"), "{e}");
    }
}
