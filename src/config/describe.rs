//! The resolved [`Config`] as plain text, for `proxy --check`: one `key: value` per line, the
//! keys named as in the TOML file, nesting shown by two-space indentation (globals, then one
//! `app:` block per app with its targets, limits, timeouts, health checks and edge settings).
//! The text depends only on the `Config` (no clock, no host state), so the same file always
//! prints the same text. Durations are written in a form the config accepts ("30s", "250ms").
//!
//! This module must never do I/O; it only formats.

use std::fmt::{self, Write};
use std::time::Duration;

use super::{
    AppConfig, Cidr, Config, DEFAULT_MAX_CONNS, HealthConfig, RouteConfig, TargetConfig, Workers,
};

/// Every setting of `cfg` an operator may want to see, one per line, ending in a newline.
pub fn describe(cfg: &Config) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail; the `fmt::Result` only serves `?` inside.
    let _ = write_config(&mut out, cfg);
    out
}

/// `d` in the largest unit that divides it exactly: "1h", "10m", "90s", "250ms", "0s"; below
/// a millisecond, fractional milliseconds ("0.5ms"). `parse_duration` reads every one back
/// to the same value.
pub fn format_duration(d: Duration) -> String {
    const MS: u128 = 1_000_000;
    const S: u128 = 1_000 * MS;
    let ns = d.as_nanos();
    if ns == 0 {
        return "0s".to_string();
    }
    for (unit, name) in [(3600 * S, "h"), (60 * S, "m"), (S, "s"), (MS, "ms")] {
        if ns.is_multiple_of(unit) {
            return format!("{}{name}", ns / unit);
        }
    }
    let frac = format!("{:06}", ns % MS);
    format!("{}.{}ms", ns / MS, frac.trim_end_matches('0'))
}

fn opt_duration(d: Option<Duration>) -> String {
    d.map_or_else(|| "off".to_string(), format_duration)
}

fn on_off(b: bool) -> &'static str {
    if b { "on" } else { "off" }
}

fn join<T>(items: &[T], f: impl Fn(&T) -> String) -> String {
    items.iter().map(f).collect::<Vec<_>>().join(", ")
}

fn cidr(c: &Cidr) -> String {
    format!("{}/{}", c.addr, c.len)
}

fn write_config(out: &mut String, cfg: &Config) -> fmt::Result {
    match &cfg.source {
        Some(path) => writeln!(out, "source: {}", path.display())?,
        None => writeln!(out, "source: command line")?,
    }
    match cfg.workers {
        Workers::Count(n) => writeln!(out, "workers: {n}")?,
        Workers::Auto => writeln!(out, "workers: auto (one per usable CPU)")?,
    }
    if cfg.cpu_pin.is_empty() {
        writeln!(out, "cpu_pin: off")?;
    } else {
        writeln!(out, "cpu_pin: {}", join(&cfg.cpu_pin, |c| c.to_string()))?;
    }
    let fit = "lowered at start if it does not fit the open-files or memory limit";
    match cfg.max_conns {
        Some(n) => writeln!(out, "max_conns: {n} ({fit})")?,
        None => writeln!(out, "max_conns: {DEFAULT_MAX_CONNS} (default; {fit})")?,
    }
    writeln!(out, "buffer_size: {} B", cfg.buffer_size)?;
    writeln!(out, "max_events: {}", cfg.max_events)?;
    writeln!(out, "backlog: {}", cfg.backlog)?;
    writeln!(out, "grace_period: {}", format_duration(cfg.grace))?;
    writeln!(out, "drain_delay: {}", format_duration(cfg.drain_delay))?;
    writeln!(out, "log_interval: {}", opt_duration(cfg.log_interval))?;
    writeln!(out, "upgrade_migrate: {}", cfg.upgrade_migrate)?;
    match cfg.admin {
        Some(a) => writeln!(out, "admin: {a}")?,
        None => writeln!(out, "admin: off")?,
    }
    writeln!(out, "apps: {}", cfg.apps.len())?;
    for app in &cfg.apps {
        write_app(out, app)?;
    }
    Ok(())
}

fn write_app(out: &mut String, app: &AppConfig) -> fmt::Result {
    writeln!(out, "app: {}", app.name)?;
    writeln!(out, "  listen: {}", join(&app.listen, |a| a.to_string()))?;
    writeln!(out, "  balance: {}", app.balance.as_str())?;
    for t in &app.targets {
        write_target(out, "  ", t)?;
    }
    match app.max_conns {
        Some(n) => writeln!(out, "  max_conns: {n}")?,
        None => writeln!(out, "  max_conns: off (the process limit only)")?,
    }
    match app.max_conns_per_source {
        Some(n) => writeln!(out, "  max_conns_per_source: {n}")?,
        None => writeln!(out, "  max_conns_per_source: off")?,
    }
    writeln!(
        out,
        "  connect_timeout: {}",
        format_duration(app.connect_timeout)
    )?;
    writeln!(out, "  idle_timeout: {}", opt_duration(app.idle_timeout))?;
    match app.retries {
        Some(n) => writeln!(out, "  retries: {n}")?,
        None => writeln!(out, "  retries: every target once")?,
    }
    write_health(out, &app.health)?;
    writeln!(out, "  accept_proxy: {}", on_off(app.accept_proxy))?;
    writeln!(
        out,
        "  send_proxy: {}",
        app.send_proxy.map_or("off", |v| v.as_str())
    )?;
    writeln!(
        out,
        "  proxy_header_timeout: {}",
        format_duration(app.proxy_header_timeout)
    )?;
    if app.allow.is_empty() {
        writeln!(out, "  allow: all")?;
    } else {
        writeln!(out, "  allow: {}", join(&app.allow, cidr))?;
    }
    if app.deny.is_empty() {
        writeln!(out, "  deny: none")?;
    } else {
        writeln!(out, "  deny: {}", join(&app.deny, cidr))?;
    }
    for r in &app.routes {
        write_route(out, r)?;
    }
    if !app.routes.is_empty() {
        writeln!(out, "  sni_required: {}", on_off(app.sni_required))?;
    }
    writeln!(out, "  access_log: {}", on_off(app.access_log))?;
    let splice = if app.splice {
        "on"
    } else if app.splice_auto {
        "auto"
    } else {
        "off"
    };
    writeln!(out, "  splice: {splice}")?;
    Ok(())
}

fn write_target(out: &mut String, indent: &str, t: &TargetConfig) -> fmt::Result {
    if t.name == t.addr.to_string() {
        writeln!(out, "{indent}target: {} weight {}", t.name, t.weight)
    } else {
        writeln!(
            out,
            "{indent}target: {} ({}) weight {}",
            t.name, t.addr, t.weight
        )
    }
}

fn write_health(out: &mut String, h: &HealthConfig) -> fmt::Result {
    match h.active {
        Some(a) => {
            writeln!(out, "  health.passive: fall {}", h.fall)?;
            writeln!(
                out,
                "  health.active: interval {}, timeout {}, rise {}, fall {}",
                format_duration(a.interval),
                format_duration(a.timeout),
                a.rise,
                a.fall
            )
        }
        None => {
            writeln!(
                out,
                "  health.passive: fall {}, down_time {}",
                h.fall,
                format_duration(h.down_time)
            )?;
            writeln!(out, "  health.active: off")
        }
    }
}

fn write_route(out: &mut String, r: &RouteConfig) -> fmt::Result {
    writeln!(
        out,
        "  route: sni {}; balance {}",
        r.sni.join(", "),
        r.balance.as_str()
    )?;
    for t in &r.targets {
        write_target(out, "    ", t)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Overrides, load_str, parse_duration};

    fn load(text: &str, name: &str) -> Config {
        match load_str(text, name, &Overrides::default()) {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        }
    }

    #[test]
    fn durations_use_the_largest_exact_unit_and_parse_back() {
        let cases = [
            ("0s", "0s"),
            ("250ms", "250ms"),
            ("1500ms", "1500ms"),
            ("1.5s", "1500ms"),
            ("5s", "5s"),
            ("90s", "90s"),
            ("120s", "2m"),
            ("10m", "10m"),
            ("60m", "1h"),
            ("1.5h", "90m"),
            ("0.5ms", "0.5ms"),
            ("0.001ms", "0.001ms"),
            ("0.3", "300ms"),
        ];
        for (input, want) in cases {
            let d = parse_duration(input).ok().flatten().unwrap_or_default();
            let shown = format_duration(d);
            assert_eq!(shown, want, "{input}");
            assert_eq!(parse_duration(&shown), Ok(Some(d)), "{input} -> {shown}");
        }
        assert_eq!(
            format_duration(Duration::from_nanos(1_234_567)),
            "1.234567ms"
        );
        assert_eq!(opt_duration(None), "off");
    }

    #[test]
    fn a_multi_app_file_shows_every_setting() {
        let mut cfg = load(
            r#"
[defaults]
workers = 2
max_conns = 500
grace_period = "5s"
drain_delay = "250ms"
log_interval = "off"
connect_timeout = "3s"

[admin]
listen = "127.0.0.1:9090"

[[app]]
name = "web"
listen = ["127.0.0.1:18080", "[::1]:18080"]
targets = ["127.0.0.1:18081", { addr = "127.0.0.1:18082", weight = 3 }]
balance = "least-conn"
max_conns = 100
max_conns_per_source = 7
idle_timeout = "10m"
retries = 1
[app.health]
interval = "2s"
timeout = "1s"
rise = 2
fall = 4

[[app]]
name = "tls"
listen = ["127.0.0.1:18443"]
targets = ["localhost:19443"]
routes = [{ sni = ["api.example.com", "*.example.com"], targets = ["127.0.0.1:19444"], balance = "random" }]
sni_required = true
allow = ["10.0.0.0/8", "::1/128"]
deny = ["10.6.6.6"]
accept_proxy = true
send_proxy = "v2"
proxy_header_timeout = "1500ms"
splice = true
access_log = true
"#,
            "multi.toml",
        );
        cfg.source = Some("multi.toml".into());
        let text = describe(&cfg);
        let want = [
            "source: multi.toml",
            "workers: 2",
            "cpu_pin: off",
            "max_conns: 500 (lowered at start if it does not fit the open-files or memory limit)",
            "buffer_size: 8192 B",
            "max_events: 128",
            "backlog: 1024",
            "grace_period: 5s",
            "drain_delay: 250ms",
            "log_interval: off",
            "upgrade_migrate: true",
            "admin: 127.0.0.1:9090",
            "apps: 2",
            "app: web",
            "  listen: 127.0.0.1:18080, [::1]:18080",
            "  balance: least-conn",
            "  target: 127.0.0.1:18081 weight 1",
            "  target: 127.0.0.1:18082 weight 3",
            "  max_conns: 100",
            "  max_conns_per_source: 7",
            "  connect_timeout: 3s",
            "  idle_timeout: 10m",
            "  retries: 1",
            "  health.passive: fall 4",
            "  health.active: interval 2s, timeout 1s, rise 2, fall 4",
            "  accept_proxy: off",
            "  send_proxy: off",
            "  proxy_header_timeout: 3s",
            "  allow: all",
            "  deny: none",
            "  access_log: off",
            "  splice: auto",
            "app: tls",
            "  listen: 127.0.0.1:18443",
            "  balance: round-robin",
            "  max_conns: off (the process limit only)",
            "  max_conns_per_source: off",
            "  idle_timeout: off",
            "  retries: every target once",
            "  health.passive: fall 3, down_time 10s",
            "  health.active: off",
            "  accept_proxy: on",
            "  send_proxy: v2",
            "  proxy_header_timeout: 1500ms",
            "  allow: 10.0.0.0/8, ::1/128",
            "  deny: 10.6.6.6/32",
            "  route: sni api.example.com, *.example.com; balance random",
            "    target: 127.0.0.1:19444 weight 1",
            "  sni_required: on",
            "  access_log: on",
            "  splice: on",
        ];
        let lines: Vec<&str> = text.lines().collect();
        for w in want {
            assert!(lines.contains(&w), "missing {w:?} in:\n{text}");
        }
        // A name is shown with the address it resolved to.
        let tls_target = lines
            .iter()
            .find(|l| l.starts_with("  target: localhost:19443 ("))
            .unwrap_or_else(|| panic!("no localhost target in:\n{text}"));
        assert!(tls_target.ends_with(") weight 1"), "{tls_target}");
        // Globals come first, then the apps in file order.
        let pos = |s: &str| lines.iter().position(|l| *l == s);
        assert!(pos("admin: 127.0.0.1:9090") < pos("app: web"));
        assert!(pos("app: web") < pos("app: tls"));
        assert!(text.ends_with("  splice: on\n"), "{text}");
        // Stable: the same config prints the same text.
        assert_eq!(describe(&cfg), text);
    }

    #[test]
    fn defaults_and_other_formats() {
        let cfg = load(
            "{\"Apps\": [{\"Name\": \"five\", \"Ports\": [0], \"Targets\": [\"127.0.0.1:5001\"]}]}",
            "apps.json",
        );
        let text = describe(&cfg);
        for w in [
            "workers: 1",
            "max_conns: 10000 (default; lowered at start if it does not fit the open-files or memory limit)",
            "grace_period: 30s",
            "drain_delay: 0s",
            "log_interval: 10s",
            "upgrade_migrate: true",
            "admin: off",
            "apps: 1",
            "app: five",
            "  listen: 0.0.0.0:0",
            "  target: 127.0.0.1:5001 weight 1",
            "  connect_timeout: 5s",
        ] {
            assert!(text.lines().any(|l| l == w), "missing {w:?} in:\n{text}");
        }
        // No routes: no route lines and no sni_required.
        assert!(
            !text.contains("route:") && !text.contains("sni_required"),
            "{text}"
        );

        let auto = Config {
            workers: Workers::Auto,
            cpu_pin: vec![0, 2, 3],
            source: Some("/etc/epoxy/proxy.toml".into()),
            ..Config::default()
        };
        let text = describe(&auto);
        assert!(
            text.starts_with("source: /etc/epoxy/proxy.toml\n"),
            "{text}"
        );
        assert!(
            text.contains("\nworkers: auto (one per usable CPU)\n"),
            "{text}"
        );
        assert!(text.contains("\ncpu_pin: 0, 2, 3\n"), "{text}");
        assert!(text.ends_with("apps: 0\n"), "{text}");
    }
}
