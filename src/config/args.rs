//! The command line as one more config format: without `--config`, `-l -p -b -P` describe one
//! app named `default`, written here as the same [`RawDoc`] the file formats produce (like a
//! one-line pipe file), so that the command line goes through the same `resolve()` and every
//! rule (own-listener loop, name resolution, limits) applies to it too. This module only
//! formats the values; it never resolves host names or validates (`resolve.rs` does).

use std::net::{IpAddr, SocketAddr};

use super::raw::{At, RawApp, RawDoc, RawListen, RawListenAt, RawTarget};

/// Name of the app the command line describes.
pub const APP_NAME: &str = "default";
/// Listen address when `-l` is not given.
pub const DEFAULT_LISTEN: &str = "0.0.0.0";
/// Listen port when `-p` is not given.
pub const DEFAULT_PORT: u16 = 8080;
/// Backend host when `-b` is not given.
pub const DEFAULT_BACKEND: &str = "127.0.0.1";
/// Backend port when `-P` is not given.
pub const DEFAULT_BACKEND_PORT: u16 = 8081;

/// The one app of a command line without `--config`, as given (defaults filled in).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppArgs {
    /// `-l`: an IP literal (IPv6 with or without brackets) or a host name.
    pub listen: String,
    /// `-p` (0 = any free port).
    pub port: u16,
    /// `-b`: an IP literal or a host name.
    pub backend: String,
    /// `-P`.
    pub backend_port: u16,
}

impl Default for AppArgs {
    fn default() -> Self {
        AppArgs {
            listen: DEFAULT_LISTEN.to_string(),
            port: DEFAULT_PORT,
            backend: DEFAULT_BACKEND.to_string(),
            backend_port: DEFAULT_BACKEND_PORT,
        }
    }
}

/// `host` as an IP literal, brackets optional (`::1`, `[::1]`, `127.0.0.1`).
pub fn ip_literal(host: &str) -> Option<IpAddr> {
    let host = host.trim();
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host)
        .parse()
        .ok()
}

/// `host:port` as a listen or target spec: an IP literal in its canonical form (IPv6 in
/// brackets, `127.0.0.1:8081`, `[::1]:9`), a name as `name:port`.
fn spec(host: &str, port: u16) -> String {
    let host = host.trim();
    match ip_literal(host) {
        Some(ip) => SocketAddr::new(ip, port).to_string(),
        None if host.contains(':') && !host.starts_with('[') => format!("[{host}]:{port}"),
        None => format!("{host}:{port}"),
    }
}

/// The one-app document. `listen` must already be an IP literal (`-l` names are resolved by
/// the caller); anything else is reported by `resolve()` under the key `listen`. Errors name
/// the keys `listen` and `backend`.
pub fn parse(args: &AppArgs) -> RawDoc {
    RawDoc {
        apps: vec![RawApp {
            name_key: "name",
            name: Some(At::new(APP_NAME.to_string(), None)),
            listen_key: "listen",
            listen: vec![RawListenAt {
                listen: RawListen::Addr(spec(&args.listen, args.port)),
                key: "listen",
                line: None,
            }],
            targets_key: "backend",
            targets: vec![RawTarget {
                spec: spec(&args.backend, args.backend_port),
                weight: None,
                key: "backend",
                line: None,
            }],
            ..RawApp::default()
        }],
        ..RawDoc::default()
    }
}
