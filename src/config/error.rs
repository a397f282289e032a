//! The one error type of configuration loading: [`ConfigError`] names the file, the line (where
//! the format has lines), the app and the key, and always prints as one line. This module owns
//! only the type and its formatting; it must never look at config values.

use std::fmt;

/// A configuration error: names the file, the line (where known), the app and the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: Option<String>,
    pub line: Option<usize>,
    pub app: Option<String>,
    pub key: Option<String>,
    pub message: String,
}

/// One line whatever the parts hold: file, app and key have control characters escaped (a
/// key name comes from the file: JSON's `"a\nb"` is a real newline), the message is folded.
impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let Some(file) = &self.file {
            write!(f, "{}", escape_controls(file))?;
            if let Some(line) = self.line {
                write!(f, ":{line}")?;
            }
            write!(f, ": ")?;
        }
        if let Some(app) = &self.app {
            write!(f, "app '{}': ", escape_controls(app))?;
        }
        if let Some(key) = &self.key {
            write!(f, "key '{}': ", escape_controls(key))?;
        }
        write!(f, "{}", escape_controls(&one_line(&self.message)))
    }
}

impl std::error::Error for ConfigError {}

impl ConfigError {
    /// An error about `key` of `app` (either may be absent) at `line` of the file being loaded;
    /// `file` is filled in by [`load_file`](super::load_file) / [`load_str`](super::load_str).
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
pub fn one_line(s: &str) -> String {
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

/// `s` with control characters escaped (`\n`, `\u{7}`), so that a value echoed in a message
/// (an app name from the file) cannot break it into lines or into terminal commands.
pub fn escape_controls(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_debug());
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by the config_json fuzz target: an unknown key with an escaped newline.
    #[test]
    fn an_error_is_one_line_whatever_its_parts_hold() {
        let e = ConfigError {
            file: Some("a\nb.json".into()),
            line: Some(4),
            app: Some("x\ny".into()),
            key: Some("NameE\\\nd".into()),
            message: "unknown field `NameE\\\nd`\n, expected one of `Name`".into(),
        };
        let s = e.to_string();
        assert!(!s.contains('\n'), "{s}");
        assert!(
            s.starts_with("a\\nb.json:4: app 'x\\ny': key 'NameE"),
            "{s}"
        );
    }
}
