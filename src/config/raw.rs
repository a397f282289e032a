//! The format-neutral raw document: a config file as written, in any of the accepted formats
//! (and the command line), each value with the line it came from. The parsers (`file.rs`,
//! `json.rs`, `pipe.rs`, `args.rs`) produce a [`RawDoc`]; `resolve.rs` turns it into a
//! [`Config`](super::Config). Plain data only: this module never parses, resolves or validates.

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

/// `splice` as written: `true`, `false` or a word (only `"auto"` is valid).
#[derive(Debug, Clone, PartialEq)]
pub enum RawSplice {
    Bool(bool),
    Word(String),
}

/// Settings an app may carry and `[defaults]` may give for every app.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawAppSettings {
    pub connect_timeout: Option<At<String>>,
    pub idle_timeout: Option<At<String>>,
    pub balance: Option<At<String>>,
    pub retries: Option<At<i64>>,
    pub access_log: Option<At<bool>>,
    pub splice: Option<At<RawSplice>>,
    pub health: Option<RawHealth>,
    /// `"v1"` or `"v2"`.
    pub send_proxy: Option<At<String>>,
    pub accept_proxy: Option<At<bool>>,
    pub proxy_header_timeout: Option<At<String>>,
    /// CIDRs as written.
    pub allow: Option<At<Vec<At<String>>>>,
    pub deny: Option<At<Vec<At<String>>>>,
    pub max_conns_per_source: Option<At<i64>>,
    pub sni_required: Option<At<bool>>,
}

/// One SNI route as written: server-name patterns, its own targets, an optional policy.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RawRoute {
    /// Line where the route starts.
    pub line: Option<usize>,
    pub sni: Vec<At<String>>,
    pub targets: Vec<RawTarget>,
    pub balance: Option<At<String>>,
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
    /// SNI routes (TOML only), in order.
    pub routes: Vec<RawRoute>,
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
    pub upgrade_migrate: Option<At<bool>>,
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

/// 1-based line number of byte `offset` in `text`.
pub fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}
