//! The pipe-line format of the simpler forwarders, accepted unchanged:
//! `local_port | remote_host | remote_port`, one app per line, `#` starts a comment (whole
//! line or trailing), blank lines are ignored. Each line becomes an app named
//! `port-<local_port>` listening on `0.0.0.0:<local_port>`. Local port 0 (any free port) may
//! appear on several lines; such an app is named `port-0-line<N>` after its line. This module only splits and reads
//! numbers; resolving and the remaining checks are `resolve.rs`'s.

use super::error::ConfigError;
use super::raw::{At, RawApp, RawDoc, RawListen, RawListenAt, RawTarget};

/// Parse pipe-line text into the format-neutral document.
pub fn parse(text: &str) -> Result<RawDoc, ConfigError> {
    let mut doc = RawDoc::default();
    // Local port -> the line that took it.
    let mut taken: Vec<(u16, usize)> = Vec::new();
    for (index, raw_line) in text.lines().enumerate() {
        let n = index + 1;
        let line = Some(n);
        let content = raw_line.split('#').next().unwrap_or("").trim();
        if content.is_empty() {
            continue;
        }
        let fields: Vec<&str> = content.split('|').map(str::trim).collect();
        if fields.len() != 3 {
            return Err(ConfigError::new(
                line,
                None,
                None,
                format!(
                    "expected 'local_port | remote_host | remote_port', found {} field(s) in '{content}'",
                    fields.len()
                ),
            ));
        }
        let (local, host, remote) = (fields[0], fields[1], fields[2]);
        let local_port = local.parse::<u16>().map_err(|_| {
            ConfigError::new(
                line,
                None,
                Some("local_port"),
                format!("'{local}' is not a port (0..=65535; 0 = any free port)"),
            )
        })?;
        let name = if local_port == 0 {
            format!("port-0-line{n}")
        } else {
            format!("port-{local_port}")
        };
        if let Some((_, first)) = taken.iter().find(|(p, _)| *p == local_port && *p != 0) {
            return Err(ConfigError::new(
                line,
                Some(&name),
                Some("local_port"),
                format!(
                    "local port {local_port} is already used on line {first} (one line per local port)"
                ),
            ));
        }
        taken.push((local_port, n));
        let remote_port = port(remote).ok_or_else(|| {
            ConfigError::new(
                line,
                Some(&name),
                Some("remote_port"),
                format!("'{remote}' is not a port (1..=65535)"),
            )
        })?;
        if host.is_empty() {
            return Err(ConfigError::new(
                line,
                Some(&name),
                Some("remote_host"),
                "must not be empty",
            ));
        }
        let bare = host.trim_start_matches('[').trim_end_matches(']');
        let spec = if bare.contains(':') {
            format!("[{bare}]:{remote_port}")
        } else {
            format!("{host}:{remote_port}")
        };
        doc.apps.push(RawApp {
            line,
            name_key: "local_port",
            name: Some(At::new(name, line)),
            listen_key: "local_port",
            listen_line: line,
            listen: vec![RawListenAt {
                listen: RawListen::Port(i64::from(local_port)),
                key: "local_port",
                line,
            }],
            targets_key: "remote_host",
            targets_line: line,
            targets: vec![RawTarget {
                spec,
                weight: None,
                key: "remote_host",
                line,
            }],
            ..RawApp::default()
        });
    }
    Ok(doc)
}

/// A port number 1..=65535.
fn port(s: &str) -> Option<u16> {
    s.parse::<u16>().ok().filter(|&p| p != 0)
}

#[cfg(test)]
mod tests {
    use super::super::{Overrides, load_str};

    fn err(text: &str) -> String {
        match load_str(text, "f.conf", &Overrides::default()) {
            Ok(c) => panic!("expected an error, got {c:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn lines_comments_and_blanks() {
        let text = "# forwarder\n\n15001 | 127.0.0.1 | 5001   # trailing\n  15002|localhost|5002\n15003 | ::1 | 5003\n";
        let c = load_str(text, "f.conf", &Overrides::default()).expect("loads");
        assert_eq!(c.apps.len(), 3);
        assert_eq!(c.apps[0].name, "port-15001");
        assert_eq!(c.apps[0].listen, vec!["0.0.0.0:15001".parse().unwrap()]);
        assert_eq!(c.apps[0].targets[0].addr, "127.0.0.1:5001".parse().unwrap());
        assert_eq!(c.apps[1].targets[0].name, "localhost:5002");
        assert_eq!(c.apps[2].targets[0].addr, "[::1]:5003".parse().unwrap());
    }

    #[test]
    fn errors_name_line_and_key() {
        let e = err("15001 | 127.0.0.1 | 5001\n15001 | 127.0.0.1 | 5002\n");
        assert!(
            e.starts_with("f.conf:2: app 'port-15001': key 'local_port': "),
            "{e}"
        );
        assert!(e.contains("already used on line 1"), "{e}");
        let e = err("# c\n99999 | 127.0.0.1 | 5001\n");
        assert!(e.starts_with("f.conf:2: key 'local_port': "), "{e}");
        let e = err("15001 | 127.0.0.1 | 0\n");
        assert!(
            e.starts_with("f.conf:1: app 'port-15001': key 'remote_port': "),
            "{e}"
        );
        let e = err("15001 | 127.0.0.1\n");
        assert!(e.starts_with("f.conf:1: "), "{e}");
        let e = err("15001 |  | 80\n");
        assert!(e.contains("key 'remote_host'"), "{e}");
        let e = err("# nothing here\n");
        assert!(e.contains("no apps"), "{e}");
    }

    #[test]
    fn bad_host_names_are_refused() {
        let e = err("15001 | 127.0.0.1 | 5001\n15002 | <b> | 80\n");
        assert!(
            e.starts_with(
                "f.conf:2: app 'port-15002': key 'remote_host': target '<b>:80' may only"
            ),
            "{e}"
        );
        let e = err("15001 | a b | 80\n");
        assert!(
            e.contains("key 'remote_host'") && e.contains("may only"),
            "{e}"
        );
    }

    #[test]
    fn local_port_zero_is_any_free_port() {
        let text = "0 | 127.0.0.1 | 5001\n\n0 | 127.0.0.1 | 5002\n";
        let c = load_str(text, "f.conf", &Overrides::default()).expect("loads");
        assert_eq!(c.apps.len(), 2);
        assert_eq!(c.apps[0].name, "port-0-line1");
        assert_eq!(c.apps[1].name, "port-0-line3");
        assert_eq!(c.apps[0].listen, vec!["0.0.0.0:0".parse().unwrap()]);
    }
}
