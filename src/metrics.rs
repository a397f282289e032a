//! Rendering of what the workers publish — Prometheus text (format 0.0.4), JSON, the live
//! connection list, access-log lines — and the admin HTTP server (tiny_http) on its own
//! thread. Reads counters only; never touches a worker's loop except by asking it, through
//! its command channel, for a list of live pairs.

use std::fmt::{self, Write as _};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde_json::{Value, json};

use crate::backend::{AppCounters, AppRuntime, TargetRuntime};
use crate::control::State;
use crate::error::Error;
use crate::stats::PauseCause;
use crate::sys;
use crate::worker::AccessRecord;
use crate::worker::pair::{CloseReason, ConnectFail};

/// Escape a label value for the text format.
fn esc(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '\\' => o.push_str("\\\\"),
            '"' => o.push_str("\\\""),
            '\n' => o.push_str("\\n"),
            c => o.push(c),
        }
    }
    o
}

/// One metric family: HELP and TYPE lines, then `name{labels} value` per sample (`labels`
/// already rendered, empty for none).
fn family<L: fmt::Display, V: fmt::Display>(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    samples: impl IntoIterator<Item = (L, V)>,
) {
    let _ = writeln!(out, "# HELP {name} {help}");
    let _ = writeln!(out, "# TYPE {name} {kind}");
    for (labels, value) in samples {
        let labels = labels.to_string();
        if labels.is_empty() {
            let _ = writeln!(out, "{name} {value}");
        } else {
            let _ = writeln!(out, "{name}{{{labels}}} {value}");
        }
    }
}

/// Process figures from /proc and getrusage.
struct ProcessInfo {
    rss_bytes: u64,
    open_fds: u64,
    max_fds: u64,
    cpu_seconds: f64,
}

fn process_info() -> ProcessInfo {
    let rss_kib = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    let open_fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count() as u64);
    let max_fds = std::fs::read_to_string("/proc/self/limits")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Max open files"))
                .and_then(|l| l.split_whitespace().nth(3))
                .and_then(|v| v.parse::<u64>().ok())
        })
        .unwrap_or(0);
    ProcessInfo {
        rss_bytes: rss_kib * 1024,
        open_fds,
        max_fds,
        cpu_seconds: sys::process_cpu_seconds(),
    }
}

/// The Prometheus text exposition.
pub fn render_prometheus(state: &State) -> String {
    let mut o = String::with_capacity(8192);
    let apps = state.apps();
    let sum = state.summary();
    let now = crate::health::now_ms();
    let ready = state.ready.load(Relaxed) && !state.draining.load(Relaxed);
    let app = |a: &AppRuntime| format!("app=\"{}\"", esc(&a.cfg.name));
    let target = |a: &AppRuntime, t: &TargetRuntime| {
        format!(
            "app=\"{}\",target=\"{}\"",
            esc(&a.cfg.name),
            esc(&t.cfg.name)
        )
    };
    let targets = || {
        apps.iter()
            .flat_map(|a| a.targets.iter().map(move |t| (a, t)))
    };
    let per_reason = |pick: fn(&AppCounters) -> &[AtomicU64; CloseReason::COUNT]| {
        apps.iter()
            .flat_map(move |a| {
                CloseReason::ALL.map(|r| {
                    let l = format!("{},reason=\"{}\"", app(a), r.as_str());
                    (l, pick(&a.counters)[r as usize].load(Relaxed))
                })
            })
            .collect::<Vec<_>>()
    };

    let version = format!("version=\"{}\"", env!("CARGO_PKG_VERSION"));
    family(
        &mut o,
        "epoxy_build_info",
        "gauge",
        "Build information.",
        [(version, 1)],
    );
    family(
        &mut o,
        "epoxy_up",
        "gauge",
        "1 while listeners are bound and the proxy is not draining.",
        [("", u8::from(ready))],
    );
    family(
        &mut o,
        "epoxy_max_connections",
        "gauge",
        "Effective global limit of concurrent pairs.",
        [("", state.max_conns)],
    );
    family(
        &mut o,
        "epoxy_connections_active",
        "gauge",
        "Live connection pairs per app.",
        apps.iter().map(|a| (app(a), a.active() as u64)),
    );
    family(
        &mut o,
        "epoxy_connections_total",
        "counter",
        "Accepted client connections per app.",
        apps.iter()
            .map(|a| (app(a), a.counters.total.load(Relaxed))),
    );
    family(
        &mut o,
        "epoxy_bytes_total",
        "counter",
        "Bytes relayed per app: upstream = client to target, downstream = target to client.",
        apps.iter().flat_map(|a| {
            [
                (
                    format!("{},direction=\"upstream\"", app(a)),
                    a.counters.bytes_up(),
                ),
                (
                    format!("{},direction=\"downstream\"", app(a)),
                    a.counters.bytes_down(),
                ),
            ]
        }),
    );
    family(
        &mut o,
        "epoxy_closes_total",
        "counter",
        "Closed connection pairs per app and reason.",
        per_reason(|c| &c.closed),
    );
    family(
        &mut o,
        "epoxy_truncated_total",
        "counter",
        "Pairs closed with bytes read from one side but never delivered to the other.",
        per_reason(|c| &c.truncated),
    );
    family(
        &mut o,
        "epoxy_connect_errors_total",
        "counter",
        "Failed upstream connect attempts per target and reason.",
        targets().flat_map(|(a, t)| {
            ConnectFail::ALL.map(|r| {
                (
                    format!("{},reason=\"{}\"", target(a, t), r.as_str()),
                    t.counters.connect_errors[r as usize].load(Relaxed),
                )
            })
        }),
    );
    family(
        &mut o,
        "epoxy_target_up",
        "gauge",
        "1 if the target is considered up by health checks.",
        targets().map(|(a, t)| (target(a, t), u8::from(t.health.is_up(now)))),
    );
    family(
        &mut o,
        "epoxy_target_connections_active",
        "gauge",
        "Live pairs connected or connecting to a target.",
        targets().map(|(a, t)| (target(a, t), t.active())),
    );
    family(
        &mut o,
        "epoxy_accept_pauses_total",
        "counter",
        "Times accepting was paused, by cause.",
        PauseCause::ALL.map(|c| {
            (
                format!("cause=\"{}\"", c.as_str()),
                sum.accept_pauses[c as usize],
            )
        }),
    );
    family(
        &mut o,
        "epoxy_config_reloads_total",
        "counter",
        "Configuration reloads by result.",
        [
            ("result=\"success\"", state.reloads[0].load(Relaxed)),
            ("result=\"failure\"", state.reloads[1].load(Relaxed)),
        ],
    );
    family(
        &mut o,
        "epoxy_worker_connections_active",
        "gauge",
        "Live pairs per worker thread.",
        state
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| (format!("worker=\"{i}\""), w.active.get())),
    );
    family(
        &mut o,
        "epoxy_worker_connections_total",
        "counter",
        "Accepted connections per worker thread.",
        state
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| (format!("worker=\"{i}\""), w.accepted.get())),
    );
    let dropped: u64 = state
        .workers
        .iter()
        .map(|w| w.access_log_dropped.get())
        .sum();
    family(
        &mut o,
        "epoxy_access_log_dropped_total",
        "counter",
        "Access-log lines dropped because the writer fell behind.",
        [("", dropped)],
    );

    let p = process_info();
    family(
        &mut o,
        "process_cpu_seconds_total",
        "counter",
        "Total user and system CPU time spent in seconds.",
        [("", p.cpu_seconds)],
    );
    family(
        &mut o,
        "process_resident_memory_bytes",
        "gauge",
        "Resident memory size in bytes.",
        [("", p.rss_bytes)],
    );
    family(
        &mut o,
        "process_open_fds",
        "gauge",
        "Number of open file descriptors.",
        [("", p.open_fds)],
    );
    family(
        &mut o,
        "process_max_fds",
        "gauge",
        "Maximum number of open file descriptors.",
        [("", p.max_fds)],
    );
    family(
        &mut o,
        "process_start_time_seconds",
        "gauge",
        "Start time of the process since unix epoch in seconds.",
        [("", state.start_time)],
    );
    o
}

fn reasons<T: Copy + Into<u64>>(vals: &[T]) -> Value {
    let mut m = serde_json::Map::new();
    for r in CloseReason::ALL {
        m.insert(r.as_str().into(), json!(vals[r as usize].into()));
    }
    Value::Object(m)
}

/// The same figures as JSON.
pub fn render_json(state: &State) -> Value {
    let sum = state.summary();
    let now = crate::health::now_ms();
    let apps: Vec<Value> = state
        .apps()
        .iter()
        .map(|a| {
            let closed: Vec<u64> = a.counters.closed.iter().map(|c| c.load(Relaxed)).collect();
            let truncated: Vec<u64> = a
                .counters
                .truncated
                .iter()
                .map(|c| c.load(Relaxed))
                .collect();
            let targets: Vec<Value> = a
                .targets
                .iter()
                .map(|t| {
                    let mut errs = serde_json::Map::new();
                    for r in ConnectFail::ALL {
                        errs.insert(
                            r.as_str().into(),
                            json!(t.counters.connect_errors[r as usize].load(Relaxed)),
                        );
                    }
                    json!({
                        "name": t.cfg.name,
                        "address": t.cfg.addr.to_string(),
                        "weight": t.cfg.weight,
                        "up": t.health.is_up(now),
                        "active_connections": t.active(),
                        "connect_errors": errs,
                    })
                })
                .collect();
            json!({
                "name": a.cfg.name,
                "listen": a.cfg.listen.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
                "balance": a.cfg.balance.as_str(),
                "active_connections": a.active(),
                "total_connections": a.counters.total.load(Relaxed),
                "bytes_upstream": a.counters.bytes_up(),
                "bytes_downstream": a.counters.bytes_down(),
                "closed": reasons(&closed),
                "truncated": reasons(&truncated),
                "targets": targets,
            })
        })
        .collect();
    let mut pauses = serde_json::Map::new();
    for c in PauseCause::ALL {
        pauses.insert(c.as_str().into(), json!(sum.accept_pauses[c as usize]));
    }
    let mut fails = serde_json::Map::new();
    for r in ConnectFail::ALL {
        fails.insert(r.as_str().into(), json!(sum.connect_fail[r as usize]));
    }
    let workers: Vec<Value> = state
        .workers
        .iter()
        .enumerate()
        .map(|(i, w)| json!({"worker": i, "active_connections": w.active.get(), "total_connections": w.accepted.get()}))
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": sum.uptime.as_secs_f64(),
        "ready": state.ready.load(Relaxed) && !state.draining.load(Relaxed),
        "max_connections": state.max_conns,
        "active_connections": state.shared.active(),
        "peak_connections": sum.peak_concurrent,
        "total_connections": sum.accepted,
        "bytes_upstream": sum.bytes_client_to_upstream,
        "bytes_downstream": sum.bytes_upstream_to_client,
        "closed": reasons(&sum.closed),
        "connect_failures": fails,
        "accept_pauses": pauses,
        "config_reloads": {"success": state.reloads[0].load(Relaxed), "failure": state.reloads[1].load(Relaxed)},
        "workers": workers,
        "apps": apps,
    })
}

/// The live pairs as JSON.
pub fn render_connections(state: &State) -> Value {
    let list = state.connections(Duration::from_secs(1));
    Value::Array(
        list.iter()
            .map(|c| {
                json!({
                    "client": c.client.to_string(),
                    "app": c.app,
                    "target": c.target,
                    "state": c.state,
                    "age_seconds": c.age.as_secs_f64(),
                    "bytes_upstream": c.bytes_up,
                    "bytes_downstream": c.bytes_down,
                    "worker": c.worker,
                })
            })
            .collect(),
    )
}

/// UTC time as "2026-11-22T15:50:01.123Z" (civil-from-days, no time-zone database).
pub fn rfc3339(t: SystemTime) -> String {
    let d = t.duration_since(UNIX_EPOCH).unwrap_or_default();
    let secs = d.as_secs() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}.{:03}Z",
        rem / 3600,
        (rem % 3600) / 60,
        rem % 60,
        d.subsec_millis()
    )
}

/// One access-log line (documented in README):
/// `CLIENT [START] APP TARGET CONNECT_MS/DURATION_MS BYTES_UP BYTES_DOWN REASON`
pub fn access_line(r: &AccessRecord) -> String {
    let start = SystemTime::now()
        .checked_sub(r.duration)
        .unwrap_or(UNIX_EPOCH);
    let target = r
        .target
        .and_then(|t| r.app.targets.get(t))
        .map_or("-".to_string(), |t| t.cfg.name.clone());
    format!(
        "{} [{}] {} {} {}/{} {} {} {}",
        r.client,
        rfc3339(start),
        r.app.cfg.name,
        target,
        r.connect_time.as_millis(),
        r.duration.as_millis(),
        r.bytes_up,
        r.bytes_down,
        r.reason.as_str()
    )
}

/// The admin HTTP endpoint.
pub struct AdminServer {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AdminServer {
    pub fn start(addr: SocketAddr, state: Arc<State>) -> Result<AdminServer, Error> {
        let server = tiny_http::Server::http(addr)
            .map_err(|e| Error::runtime(format!("bind admin {addr}: {e}")))?;
        let bound = server.server_addr().to_ip().unwrap_or(addr);
        let stop = Arc::new(AtomicBool::new(false));
        let stop2 = stop.clone();
        let thread = std::thread::Builder::new()
            .name("epoxy-admin".into())
            .spawn(move || {
                while !stop2.load(Relaxed) {
                    match server.recv_timeout(Duration::from_millis(100)) {
                        Ok(Some(req)) => handle(req, &state),
                        Ok(None) => {}
                        Err(e) => {
                            log::debug!("admin: {e}");
                            std::thread::sleep(Duration::from_millis(10));
                        }
                    }
                }
            })
            .map_err(|e| Error::io("spawn admin thread", e))?;
        Ok(AdminServer {
            addr: bound,
            stop,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn stop(mut self) {
        self.stop.store(true, Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn header(name: &str, value: &str) -> Option<tiny_http::Header> {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

fn respond(req: tiny_http::Request, code: u16, ctype: &str, body: String) {
    let mut resp = tiny_http::Response::from_string(body).with_status_code(code);
    if let Some(h) = header("Content-Type", ctype) {
        resp = resp.with_header(h);
    }
    if let Err(e) = req.respond(resp) {
        log::debug!("admin: respond: {e}");
    }
}

fn handle(req: tiny_http::Request, state: &State) {
    let url = req.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
    let is_get = matches!(
        req.method(),
        tiny_http::Method::Get | tiny_http::Method::Head
    );
    if !is_get {
        respond(
            req,
            405,
            "text/plain; charset=utf-8",
            "method not allowed\n".into(),
        );
        return;
    }
    const JSON: &str = "application/json";
    match path {
        "/metrics" => {
            let json_wanted = query.split('&').any(|kv| kv == "format=json");
            if json_wanted {
                respond(req, 200, JSON, render_json(state).to_string());
            } else {
                respond(
                    req,
                    200,
                    "text/plain; version=0.0.4; charset=utf-8",
                    render_prometheus(state),
                );
            }
        }
        "/connections" => respond(req, 200, JSON, render_connections(state).to_string()),
        "/healthz" => respond(req, 200, "text/plain; charset=utf-8", "ok\n".into()),
        "/readyz" => {
            let ready = state.ready.load(Relaxed) && !state.draining.load(Relaxed);
            if ready {
                respond(req, 200, "text/plain; charset=utf-8", "ready\n".into());
            } else {
                respond(req, 503, "text/plain; charset=utf-8", "draining\n".into());
            }
        }
        _ => respond(req, 404, "text/plain; charset=utf-8", "not found\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339_known_dates() {
        assert_eq!(rfc3339(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
        let t = UNIX_EPOCH + Duration::from_millis(1_795_362_601_123);
        assert_eq!(rfc3339(t), "2026-11-22T15:50:01.123Z");
        let leap = UNIX_EPOCH + Duration::from_secs(951_782_400); // 2000-02-29
        assert_eq!(&rfc3339(leap)[..10], "2000-02-29");
    }

    #[test]
    fn label_escaping() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
