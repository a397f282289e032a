//! Rendering of the read-only view: Prometheus text (format 0.0.4), the JSON form of the same
//! figures, and the live-connection list. Pure formatting over counters and `/proc`; metric
//! names, labels and JSON keys are a public contract (README): add, never rename.

use std::fmt::{self, Write as _};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use serde_json::{Value, json};

use super::server::AdminCounters;
use super::view::ProxyView;
use crate::backend::{AppRuntime, TargetRuntime};
use crate::outcome::{CloseReason, ConnectFail, PauseCause};
use crate::stats::AppCounters;
use crate::sys;

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
pub(super) struct ProcessInfo {
    pub(super) rss_bytes: u64,
    pub(super) open_fds: u64,
    pub(super) max_fds: u64,
    pub(super) cpu_seconds: f64,
}

pub(super) fn process_info() -> ProcessInfo {
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
pub fn prometheus(view: &ProxyView) -> String {
    let mut o = String::with_capacity(8192);
    let apps = view.apps();
    let sum = view.summary();
    let now = crate::health::now_ms();
    let ready = view.serving();
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
        [("", view.max_conns)],
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
                    a.counters.bytes_to_upstream(),
                ),
                (
                    format!("{},direction=\"downstream\"", app(a)),
                    a.counters.bytes_to_client(),
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
    let closed_for = |r: CloseReason| {
        apps.iter()
            .map(move |a| (app(a), a.counters.closed[r as usize].load(Relaxed)))
    };
    family(
        &mut o,
        "epoxy_acl_denied_total",
        "counter",
        "Clients refused by the app's allow/deny lists (also in epoxy_closes_total).",
        closed_for(CloseReason::AclDenied),
    );
    family(
        &mut o,
        "epoxy_source_limited_total",
        "counter",
        "Clients refused by max_conns_per_source (also in epoxy_closes_total).",
        closed_for(CloseReason::SourceLimit),
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
            ("result=\"success\"", view.reloads.success.load(Relaxed)),
            ("result=\"failure\"", view.reloads.failure.load(Relaxed)),
        ],
    );
    family(
        &mut o,
        "epoxy_upgrades_total",
        "counter",
        "Binary upgrades (SIGUSR2) by result.",
        [
            ("result=\"success\"", view.upgrades.success.load(Relaxed)),
            ("result=\"failure\"", view.upgrades.failure.load(Relaxed)),
        ],
    );
    let m = &view.migration;
    family(
        &mut o,
        "epoxy_migrated_connections_total",
        "counter",
        "Live pairs moved here from the old process by an upgrade (upgrade_migrate).",
        [("", m.pairs.load(Relaxed))],
    );
    family(
        &mut o,
        "epoxy_migration_batches_total",
        "counter",
        "Batches of live pairs moved here by an upgrade.",
        [("", m.batches.load(Relaxed))],
    );
    family(
        &mut o,
        "epoxy_migration_stall_seconds_total",
        "counter",
        "Sum over moved batches of the time their pairs were parked (neither process relaying).",
        [("", m.stall_us_sum.load(Relaxed) as f64 / 1e6)],
    );
    family(
        &mut o,
        "epoxy_migration_stall_max_seconds",
        "gauge",
        "Longest time one moved batch was parked.",
        [("", m.stall_us_max.load(Relaxed) as f64 / 1e6)],
    );
    family(
        &mut o,
        "epoxy_worker_connections_active",
        "gauge",
        "Live pairs per worker thread.",
        view.workers
            .iter()
            .enumerate()
            .map(|(i, w)| (format!("worker=\"{i}\""), w.active.get())),
    );
    family(
        &mut o,
        "epoxy_worker_connections_total",
        "counter",
        "Accepted connections per worker thread.",
        view.workers
            .iter()
            .enumerate()
            .map(|(i, _)| (format!("worker=\"{i}\""), view.worker_accepted(i))),
    );
    let dropped = sum.access_log_dropped;
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
        [("", view.start_time)],
    );
    o
}

/// Milliseconds as seconds, to one decimal.
fn secs(ms: u64) -> f64 {
    (ms / 100) as f64 / 10.0
}

/// The admin endpoint's own families: connections it accepted and turned away.
pub fn admin_families(out: &mut String, c: &AdminCounters) {
    family(
        out,
        "epoxy_admin_connections_total",
        "counter",
        "Connections accepted by the admin endpoint.",
        [("", c.accepted.load(Relaxed))],
    );
    family(
        out,
        "epoxy_admin_rejected_total",
        "counter",
        "Admin connections turned away or cut short, by reason.",
        c.rejections().map(|(r, n)| (format!("reason=\"{r}\""), n)),
    );
}

fn reasons<T: Copy + Into<u64>>(vals: &[T]) -> Value {
    let mut m = serde_json::Map::new();
    for r in CloseReason::ALL {
        m.insert(r.as_str().into(), json!(vals[r as usize].into()));
    }
    Value::Object(m)
}

/// The same figures as JSON.
pub fn json(view: &ProxyView) -> Value {
    let sum = view.summary();
    let now = crate::health::now_ms();
    let apps: Vec<Value> = view
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
                    let since = t.health.since_ms(now);
                    let last_check = t.health.last_probe().map(|(r, at)| {
                        json!({"result": r.as_str(), "seconds_ago": secs(now.saturating_sub(at))})
                    });
                    json!({
                        "name": t.cfg.name,
                        "address": t.cfg.addr.to_string(),
                        "weight": t.cfg.weight,
                        "up": t.health.is_up(now),
                        "state_seconds": secs(now.saturating_sub(since)),
                        "last_check": last_check,
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
                "peak_connections": a.counters.live.peak(),
                "max_connections": a.cfg.max_conns,
                "health_checks": if a.cfg.health.active.is_some() { "active" } else { "passive" },
                "total_connections": a.counters.total.load(Relaxed),
                "bytes_upstream": a.counters.bytes_to_upstream(),
                "bytes_downstream": a.counters.bytes_to_client(),
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
    let workers: Vec<Value> = view
        .workers
        .iter()
        .enumerate()
        .map(|(i, w)| json!({"worker": i, "active_connections": w.active.get(), "total_connections": view.worker_accepted(i)}))
        .collect();
    json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": sum.uptime.as_secs_f64(),
        "ready": view.serving(),
        "max_connections": view.max_conns,
        "active_connections": view.active(),
        "peak_connections": sum.peak_concurrent,
        "total_connections": sum.accepted,
        "bytes_upstream": sum.bytes_client_to_upstream,
        "bytes_downstream": sum.bytes_upstream_to_client,
        "closed": reasons(&sum.closed),
        "connect_failures": fails,
        "accept_pauses": pauses,
        "config_reloads": {"success": view.reloads.success.load(Relaxed), "failure": view.reloads.failure.load(Relaxed)},
        "upgrades": {"success": view.upgrades.success.load(Relaxed), "failure": view.upgrades.failure.load(Relaxed)},
        "pid": std::process::id(),
        "workers": workers,
        "apps": apps,
    })
}

/// The live pairs as JSON.
pub fn connections(view: &ProxyView) -> Value {
    let list = view.live.list(Duration::from_secs(1));
    Value::Array(
        list.iter()
            .map(|c| {
                json!({
                    "client": c.client.to_string(),
                    "app": c.app,
                    "target": c.target,
                    "state": c.state,
                    "age_seconds": c.age.as_secs_f64(),
                    "bytes_upstream": c.bytes_to_upstream,
                    "bytes_downstream": c.bytes_to_client,
                    "server_name": c.server_name,
                    "worker": c.worker,
                })
            })
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_escaping() {
        assert_eq!(esc("a\"b\\c\nd"), "a\\\"b\\\\c\\nd");
    }
}
