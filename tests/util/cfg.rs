//! Helpers shared by the feature tests (routing, observe, scale): proxies started from config
//! files whose listeners bind port 0 (addresses read back from the log), reloads, the admin
//! endpoint (address from the log, HTTP GET, Prometheus text samples) and a clean SIGTERM exit.

use std::fs;
use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use super::{
    Listener, PROXY_BIN, ProxyHandle, assert_no_panic, proc_listen_addrs, scaled_secs, send_signal,
    spawn_proxy_to, startup_timeout,
};

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

/// The `listen` entry for the `n`-th listener (n >= 1) of a config file: `"127.0.0.N:0"`,
/// any free port on its own loopback address.
///
/// Why not `127.0.0.1:0` for all: the proxy resolves a port-0 entry *by its configured
/// address* when it logs its listeners and when a reload decides which listeners to keep, so
/// several entries spelled `127.0.0.1:0` all log the first one's port, and a reload that adds
/// another `127.0.0.1:0` keeps an old listener instead of binding a new one. Distinct
/// configured addresses keep every listener apart (the whole 127/8 is loopback on Linux).
pub fn any_port(n: u8) -> String {
    assert!(n >= 1, "listener numbers start at 1");
    format!("127.0.0.{n}:0")
}

/// 127.0.0.1:`port`.
pub fn local(port: u16) -> SocketAddr {
    SocketAddr::from((Ipv4Addr::LOCALHOST, port))
}

/// A proxy started from a config file, with the listeners it logged (config order).
pub struct Started {
    pub proxy: ProxyHandle,
    pub file: TempFile,
    pub listeners: Vec<Listener>,
    pub admin: Option<SocketAddr>,
}

impl Started {
    /// The `i`-th listener (config order), connectable.
    pub fn addr(&self, i: usize) -> SocketAddr {
        self.listeners
            .get(i)
            .unwrap_or_else(|| panic!("no listener #{i}: {:?}", self.listeners))
            .connect_addr()
    }

    /// Every listener of app `app` (config order), connectable.
    pub fn app_addrs(&self, app: &str) -> Vec<SocketAddr> {
        let v: Vec<SocketAddr> = self
            .listeners
            .iter()
            .filter(|l| l.app == app)
            .map(Listener::connect_addr)
            .collect();
        assert!(
            !v.is_empty(),
            "app '{app}' logged no listener: {:?}",
            self.listeners
        );
        v
    }

    /// The (first) listener of app `app`, connectable.
    pub fn app_addr(&self, app: &str) -> SocketAddr {
        self.app_addrs(app)[0]
    }

    /// Writes `contents` to the config file, sends SIGHUP and waits for `configuration
    /// reloaded`; returns the listening lines this reload logged (its new listeners; all of
    /// them when it added none). Panics if the reload fails or is not logged in time.
    pub fn reload(&self, contents: &str) -> Vec<Listener> {
        self.file.write(contents);
        let from = self.proxy.stderr_line_count();
        send_signal(self.proxy.pid(), libc::SIGHUP).expect("SIGHUP");
        let timeout = scaled_secs(10);
        let ok = self.proxy.wait_stderr_lines_matching(from, timeout, |l| {
            l.contains("configuration reloaded") || l.contains("reload failed")
        });
        let text = self.proxy.stderr_text();
        assert!(
            ok,
            "no reload logged within {timeout:?} of SIGHUP; stderr:\n{text}"
        );
        let lines = self.proxy.stderr_lines_since(from);
        assert!(
            !lines.iter().any(|l| l.contains("reload failed")),
            "reload failed; stderr:\n{text}"
        );
        // Lines of one reload come from one thread, in order: stop at its end.
        let end = lines
            .iter()
            .position(|l| l.contains("configuration reloaded"))
            .expect("reload line");
        lines[..end]
            .iter()
            .filter_map(|l| super::parse_listener(l))
            .collect()
    }
}

/// Starts `proxy -c FILE` (extension `ext`, `contents`) plus `extra` flags and, when `admin`,
/// `--admin 127.0.0.1:0`. Waits for `listeners` listening lines (and the admin line). The
/// file's listeners should bind port 0 (`any_port`), so nothing can take them meanwhile.
pub fn start_cfg(
    ext: &str,
    listeners: usize,
    extra: &[&str],
    admin: bool,
    contents: &str,
) -> Started {
    start_cfg_env(ext, listeners, extra, admin, contents, &[])
}

/// `start_cfg` with environment variables for the proxy.
pub fn start_cfg_env(
    ext: &str,
    listeners: usize,
    extra: &[&str],
    admin: bool,
    contents: &str,
    env: &[(&str, &str)],
) -> Started {
    let file = TempFile::new(ext, contents);
    let mut cmd = Command::new(PROXY_BIN);
    cmd.arg("-c").arg(file.path()).args(extra);
    cmd.envs(env.iter().copied());
    if admin {
        cmd.args(["--admin", "127.0.0.1:0"]);
    }
    let mut h = ProxyHandle::spawn_raw(cmd);
    let timeout = startup_timeout();
    let deadline = Instant::now() + timeout;
    loop {
        let admin_addr = admin_addr_of(&h.stderr_text());
        let found = h.listeners_since(0);
        if found.len() >= listeners && (!admin || admin_addr.is_some()) {
            let found = resolve_duplicates(&h, found, admin_addr);
            return Started {
                proxy: h,
                file,
                listeners: found,
                admin: admin_addr,
            };
        }
        if h.has_exited() {
            let _ = h.wait_exit(scaled_secs(5));
            panic!(
                "proxy exited at start; config:\n{contents}\nstderr:\n{}",
                h.stderr_text()
            );
        }
        assert!(
            Instant::now() < deadline,
            "proxy did not log {listeners} listener(s){} within {timeout:?}; stderr:\n{}",
            if admin { " and its admin endpoint" } else { "" },
            h.stderr_text()
        );
        let n = h.stderr_line_count();
        h.wait_stderr_lines_above(n, Duration::from_millis(50));
    }
}

/// Seed-format files (`ports = [0, 0]`, `0 | host | port`) cannot give each port-0 entry its
/// own configured address, and the proxy then logs the first one's port for all of them (see
/// `any_port`). When the logged addresses repeat, take the real ones from /proc: the proxy
/// binds its listeners in config order before anything else can open a socket, so the
/// listening sockets in fd order are the listeners in config order (admin excluded).
fn resolve_duplicates(
    h: &ProxyHandle,
    found: Vec<Listener>,
    admin: Option<SocketAddr>,
) -> Vec<Listener> {
    let mut seen: Vec<SocketAddr> = Vec::new();
    let dup = found.iter().any(|l| {
        let d = seen.contains(&l.addr);
        seen.push(l.addr);
        d
    });
    if !dup {
        return found;
    }
    let real: Vec<SocketAddr> = proc_listen_addrs(h.pid())
        .expect("read the proxy's sockets from /proc")
        .into_iter()
        .filter(|a| Some(*a) != admin)
        .collect();
    assert_eq!(
        real.len(),
        found.len(),
        "logged listeners {found:?} repeat an address, and /proc shows {real:?}"
    );
    eprintln!("note: the proxy logged repeated listener addresses {found:?}; /proc has {real:?}");
    found
        .into_iter()
        .zip(real)
        .map(|(l, addr)| Listener { app: l.app, addr })
        .collect()
}

/// `start_cfg` for the common case: a TOML file with one app `name` listening on one port-0
/// address, `rest` being the remaining lines of its `[[app]]` table (targets, settings).
pub fn start_one_app(name: &str, admin: bool, rest: &str) -> Started {
    start_cfg(
        "toml",
        1,
        &[],
        admin,
        &format!(
            "[[app]]\nname = \"{name}\"\nlisten = [\"{}\"]\n{rest}",
            any_port(1)
        ),
    )
}

/// Spawns the CLI proxy in front of `backend` with `--admin 127.0.0.1:0` and `extra`;
/// returns it with the admin address.
pub fn spawn_with_admin(backend: SocketAddr, extra: &[&str]) -> (ProxyHandle, SocketAddr) {
    let mut args = vec!["--admin", "127.0.0.1:0"];
    args.extend_from_slice(extra);
    let p = spawn_proxy_to(backend, &args);
    assert!(
        p.wait_stderr_contains("admin endpoint on", startup_timeout()),
        "no admin line; stderr:\n{}",
        p.stderr_text()
    );
    let admin = admin_addr_of(&p.stderr_text()).expect("admin address");
    (p, admin)
}

/// Sends SIGTERM, waits up to (scaled) 15 s for exit status 0 and checks stderr shows no panic.
/// Returns stderr.
pub fn exit_cleanly(mut p: ProxyHandle) -> String {
    p.sigterm();
    let st = p.wait_exit(scaled_secs(15));
    let text = p.stderr_text();
    assert!(
        st.is_some_and(|s| s.success()),
        "proxy did not exit 0 after SIGTERM ({st:?}); stderr:\n{text}"
    );
    assert_no_panic(&text);
    text
}

/// Whether a connection to `addr` is refused (nothing listens there).
pub fn is_refused(addr: SocketAddr) -> bool {
    matches!(
        TcpStream::connect_timeout(&addr, scaled_secs(5)),
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
    let mut s = TcpStream::connect_timeout(&addr, scaled_secs(10))?;
    s.set_read_timeout(Some(scaled_secs(10)))?;
    s.set_write_timeout(Some(scaled_secs(10)))?;
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
