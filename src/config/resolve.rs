//! Defaults, precedence (CLI flag > app setting > [defaults] > built-in) and validation.
//! STUB: to be completed by the config work (issue 3).

use std::fmt;
use std::path::Path;
use std::time::Duration;

use super::{Config, Workers};

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
    let value: f64 = num
        .parse()
        .map_err(|_| format!("invalid duration '{s}' (use e.g. 250ms, 5s, 10m, off)"))?;
    let mult = match unit.trim() {
        "ms" => 0.001,
        "" | "s" => 1.0,
        "m" => 60.0,
        "h" => 3600.0,
        _ => return Err(format!("invalid duration unit in '{s}' (use ms, s, m, h or off)")),
    };
    let secs = value * mult;
    if !secs.is_finite() || secs < 0.0 || secs > 1e9 {
        return Err(format!("duration '{s}' out of range"));
    }
    Ok(Some(Duration::from_secs_f64(secs)))
}

/// Load and validate a config file (format by extension), then apply CLI overrides.
pub fn load_file(path: &Path, _ov: &Overrides) -> Result<Config, ConfigError> {
    Err(ConfigError {
        file: Some(path.display().to_string()),
        line: None,
        app: None,
        key: None,
        message: "config files are not supported yet".into(),
    })
}
