//! Helpers shared by the feature tests (routing, observe, scale): proxies started from config
//! files with free ports written in them, the admin endpoint (address from the log, HTTP GET,
//! Prometheus text samples) and a clean SIGTERM exit.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{PROXY_BIN, ProxyHandle, STARTUP_TIMEOUT, assert_no_panic, free_port, spawn_proxy_to};

// ---------------------------------------------------------------------------------------------
// Config files and proxies started from them
// ---------------------------------------------------------------------------------------------

/// A config file in the temp directory, removed on drop.
pub struct TempFile(PathBuf);

impl TempFile {
    pub fn new(ext: &str, contents: &str) -> TempFile {
        static SEQ: AtomicUsize = AtomicUsize::new(0);
        let n = SEQ.fetch_add(1, Ordering::SeqCst);
        let path = std::env::temp_dir().join(format!(
            "epoxy-test-{}-{n}-{}.{ext}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        ));
        let f = TempFile(path);
        f.write(contents);
        f
    }

    /// Replaces the file's contents (e.g. before a SIGHUP reload).
    pub fn write(&self, contents: &str) {
        fs::write(&self.0, contents).expect("write config file");
    }

    pub fn path(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

/// A proxy started from a config file with free ports written in it.
pub struct Started {
    pub proxy: ProxyHandle,
    pub file: TempFile,
    pub ports: Vec<u16>,
    pub admin: Option<SocketAddr>,
}

/// `nports` distinct ports that were free a moment ago.
pub fn free_ports(nports: usize) -> Vec<u16> {
    let mut v: Vec<u16> = Vec::with_capacity(nports);
    let deadline = Instant::now() + Duration::from_secs(5);
    while v.len() < nports {
        assert!(Instant::now() < deadline, "cannot find free ports");
        let p = free_port();
        if !v.contains(&p) {
            v.push(p);
        }
    }
    v
}

/// Starts `proxy -c FILE` (extension `ext`, contents `make(ports)`) plus `extra` flags and,
/// when `admin`, `--admin 127.0.0.1:0`. Waits for `listeners` listening lines (and the admin
/// line). Retries with new ports when a port was taken meanwhile.
pub fn start_cfg(
    ext: &str,
    nports: usize,
    listeners: usize,
    extra: &[&str],
    admin: bool,
    make: &dyn Fn(&[u16]) -> String,
) -> Started {
    let mut last_err = String::new();
    for _attempt in 0..5 {
        let ports = free_ports(nports);
        let file = TempFile::new(ext, &make(&ports));
        let mut cmd = Command::new(PROXY_BIN);
        cmd.arg("-c").arg(file.path()).args(extra);
        if admin {
            cmd.args(["--admin", "127.0.0.1:0"]);
        }
        let mut h = ProxyHandle::spawn_raw(cmd);
        let deadline = Instant::now() + STARTUP_TIMEOUT;
        loop {
            let text = h.stderr_text();
            let admin_addr = admin_addr_of(&text);
            if h.addrs().len() >= listeners && (!admin || admin_addr.is_some()) {
                return Started {
                    proxy: h,
                    file,
                    ports,
                    admin: admin_addr,
                };
            }
            if h.has_exited() {
                let _ = h.wait_exit(Duration::from_secs(2));
                last_err = h.stderr_text();
                break;
            }
            assert!(
                Instant::now() < deadline,
                "proxy did not start within {STARTUP_TIMEOUT:?}; stderr:\n{}",
                h.stderr_text()
            );
            let n = h.stderr_line_count();
            h.wait_stderr_lines_above(n, Duration::from_millis(50));
        }
        if !last_err.to_lowercase().contains("in use") {
            panic!("proxy exited at start; stderr:\n{last_err}");
        }
    }
    panic!("proxy could not bind free ports after 5 attempts; last stderr:\n{last_err}");
}

/// `start_cfg` for the common case: a TOML file with one app `name` listening on one free
/// port, `rest` being the remaining lines of its `[[app]]` table (targets, settings).
pub fn start_one_app(name: &str, admin: bool, rest: &str) -> Started {
    start_cfg("toml", 1, 1, &[], admin, &|p| {
        format!(
            "[[app]]\nname = \"{name}\"\nlisten = [\"127.0.0.1:{}\"]\n{rest}",
            p[0]
        )
    })
}

/// Spawns the CLI proxy in front of `backend` with `--admin 127.0.0.1:0` and `extra`;
/// returns it with the admin address.
pub fn spawn_with_admin(backend: SocketAddr, extra: &[&str]) -> (ProxyHandle, SocketAddr) {
    let mut args = vec!["--admin", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let p = spawn_proxy_to(backend, &args);
    assert!(
        p.wait_stderr_contains("admin endpoint on", Duration::from_secs(5)),
        "no admin line; stderr:\n{}",
        p.stderr_text()
    );
    let admin = admin_addr_of(&p.stderr_text()).expect("admin address");
    (p, admin)
}

/// Sends SIGTERM, waits up to 10 s for exit status 0 and checks stderr shows no panic.
/// Returns stderr.
pub fn exit_cleanly(mut p: ProxyHandle) -> String {
    p.sigterm();
    let st = p.wait_exit(Duration::from_secs(10));
    let text = p.stderr_text();
    assert!(
        st.is_some_and(|s| s.success()),
        "proxy did not exit 0 after SIGTERM ({st:?}); stderr:\n{text}"
    );
    assert_no_panic(&text);
    text
}

/// 127.0.0.1:`port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// Whether a connection to `addr` is refused (nothing listens there).
pub fn is_refused(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect_timeout(&addr, Duration::from_millis(500)),
        Err(ref e) if e.kind() == io::ErrorKind::ConnectionRefused
    )
}

// ---------------------------------------------------------------------------------------------
// The admin endpoint
// ---------------------------------------------------------------------------------------------

/// The admin address from the `admin endpoint on http://ADDR/metrics` log line.
pub fn admin_addr_of(text: &str) -> Option<SocketAddr> {
    let key = "admin endpoint on http://";
    let i = text.find(key)?;
    let rest = &text[i + key.len()..];
    rest.split('/').next()?.parse().ok()
}

/// HTTP/1.0 GET; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    s.set_write_timeout(Some(Duration::from_secs(5)))?;
    write!(s, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n")?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io::Error::other(format!("bad response: {head:?}")))?;
    Ok((status, body.to_string()))
}

/// The body of `GET /metrics`; asserts status 200.
pub fn metrics_text(admin: SocketAddr) -> String {
    let (code, body) = http_get(admin, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200, "GET /metrics status");
    body
}

/// Every sample of `name` in a Prometheus text exposition: its labels and value.
pub fn samples(text: &str, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
    let mut out = Vec::new();
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, labels) = match series.split_once('{') {
            Some((n, rest)) => (
                n,
                rest.trim_end_matches('}')
                    .split("\",")
                    .filter(|kv| !kv.is_empty())
                    .filter_map(|kv| {
                        let (k, v) = kv.split_once('=')?;
                        Some((k.to_string(), v.trim_matches('"').to_string()))
                    })
                    .collect(),
            ),
            None => (series, Vec::new()),
        };
        if n == name
            && let Ok(v) = value.parse::<f64>()
        {
            out.push((labels, v));
        }
    }
    out
}

/// Value of the sample `name{labels}` (exact label set, in any order) in a Prometheus text
/// exposition.
pub fn metric(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    let mut want: Vec<(String, String)> = labels
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    want.sort();
    samples(text, name).into_iter().find_map(|(mut got, v)| {
        got.sort();
        (got == want).then_some(v)
    })
}
