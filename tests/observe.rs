//! Observability and lifecycle (issue 4): the admin endpoint (Prometheus text checked with
//! promtool, JSON, /connections, /healthz, /readyz), exact byte accounting, the access log,
//! SIGHUP reload under load (valid and invalid files), drain readiness and the truncation
//! counter.
//!
//! Config files listen on port 0 (`any_port`) and the admin endpoint on `127.0.0.1:0`; the
//! bound addresses are read from the log. Every wait has a (scaled) deadline.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::util::*;

// ---------------------------------------------------------------------------------------------
// Helpers local to this file
// ---------------------------------------------------------------------------------------------

fn json_get(admin: SocketAddr, path: &str) -> Value {
    let (code, body) = http_get(admin, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
    assert_eq!(code, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: bad JSON ({e}): {body}"))
}

/// `promtool check metrics` on `text`: None when promtool is not installed.
fn promtool_check(text: &str) -> Option<Result<(), String>> {
    let mut child = match Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
    {
        Ok(c) => c,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return None,
        Err(e) => return Some(Err(format!("spawn promtool: {e}"))),
    };
    let mut stdin = child.stdin.take().expect("stdin");
    let body = text.to_string();
    let writer = thread::spawn(move || {
        let _ = stdin.write_all(body.as_bytes());
    });
    let deadline = Instant::now() + scaled_secs(30);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(20)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                return Some(Err("promtool did not finish in time".into()));
            }
        }
    }
    let _ = writer.join();
    let out = child.wait_with_output().expect("promtool output");
    if out.status.success() {
        Some(Ok(()))
    } else {
        Some(Err(format!(
            "promtool check metrics failed ({}):\n{}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// Waits until no pair of `app` is live.
fn wait_app_idle(admin: SocketAddr, app: &str) {
    let within = scaled_secs(10);
    let ok = wait_until(within, || {
        metric(
            &metrics_text(admin),
            "epoxy_connections_active",
            &[("app", app)],
        ) == Some(0.0)
    });
    assert!(ok, "app '{app}' still has live pairs after {within:?}");
}

/// Waits until the closes counted over all apps reach `n` (a close is counted right after
/// its sockets are closed, so a client may see the end a moment before the counter moves).
fn wait_closes(admin: SocketAddr, n: u64) {
    let sum = || -> f64 {
        samples(&metrics_text(admin), "epoxy_closes_total")
            .iter()
            .map(|(_, v)| v)
            .sum()
    };
    assert!(
        wait_until(scaled_secs(10), || sum() >= n as f64),
        "closes counted: {}, want {n}",
        sum()
    );
}

/// Sum of every `epoxy_truncated_total` sample; asserts it is 0.
fn assert_no_truncation(text: &str) {
    let s = samples(text, "epoxy_truncated_total");
    assert!(!s.is_empty(), "no epoxy_truncated_total samples");
    let bad: Vec<_> = s.iter().filter(|(_, v)| *v != 0.0).collect();
    assert!(bad.is_empty(), "truncations counted: {bad:?}");
}

/// Sends `req_len` bytes of pattern `seed`, half-closes, reads the reply to EOF.
/// Returns the reply length.
fn request_reply(addr: SocketAddr, seed: u64, req_len: u64) -> (TcpStream, u64) {
    let mut c = connect(addr);
    let w = c.try_clone().expect("clone");
    let writer = thread::spawn(move || {
        let mut w = w;
        let r = write_pattern(&mut w, seed, req_len);
        let _ = w.shutdown(Shutdown::Write);
        r
    });
    let (len, _) = read_to_eof_hash(&mut c, Instant::now() + scaled_secs(30)).expect("read reply");
    writer.join().expect("writer").expect("write request");
    (c, len)
}

const REQUIRED_METRICS: &[&str] = &[
    "epoxy_build_info",
    "epoxy_connections_active",
    "epoxy_connections_total",
    "epoxy_bytes_total",
    "epoxy_closes_total",
    "epoxy_truncated_total",
    "epoxy_connect_errors_total",
    "epoxy_target_up",
    "epoxy_target_connections_active",
    "epoxy_accept_pauses_total",
    "epoxy_config_reloads_total",
    "epoxy_worker_connections_active",
    "epoxy_worker_connections_total",
    "process_resident_memory_bytes",
    "process_open_fds",
    "process_cpu_seconds_total",
    "process_start_time_seconds",
];

// ---------------------------------------------------------------------------------------------
// Admin endpoint
// ---------------------------------------------------------------------------------------------

#[test]
fn metrics_scrape_under_load_passes_promtool() {
    let echo = echo_server();
    let (proxy, admin) = spawn_with_admin(echo.addr(), &[]);
    let addr = proxy.addr();
    let stop = Arc::new(AtomicBool::new(false));
    let rounds = Arc::new(AtomicU64::new(0));
    let load: Vec<_> = (0..6)
        .map(|i| {
            let (stop, rounds) = (stop.clone(), rounds.clone());
            thread::spawn(move || -> io::Result<()> {
                let msg = Pattern::bytes(i, 1024);
                while !stop.load(Ordering::SeqCst) {
                    let mut c = try_connect(addr, scaled_secs(10))?;
                    for _ in 0..10 {
                        let back = roundtrip(&mut c, &msg, scaled_secs(10))?;
                        if back != msg {
                            return Err(io::Error::other("echo differs"));
                        }
                        rounds.fetch_add(1, Ordering::SeqCst);
                    }
                }
                Ok(())
            })
        })
        .collect();
    assert!(
        wait_until(scaled_secs(10), || rounds.load(Ordering::SeqCst) > 100),
        "no load flowing"
    );
    let mut last = String::new();
    for _ in 0..5 {
        last = metrics_text(admin);
        for name in REQUIRED_METRICS {
            assert!(
                last.contains(&format!("# TYPE {name} ")),
                "metric {name} missing from /metrics:\n{last}"
            );
        }
        // Spreads the scrapes over the load; nothing is decided by the pause.
        thread::sleep(Duration::from_millis(100));
    }
    let under_load = last.clone();
    // Counters end in _total; labels never carry client addresses.
    for line in under_load.lines().filter(|l| l.starts_with("# TYPE ")) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.get(3) == Some(&"counter") {
            assert!(f[2].ends_with("_total"), "counter without _total: {line}");
        }
    }
    let active = metric(
        &under_load,
        "epoxy_connections_active",
        &[("app", "default")],
    );
    println!("under load: epoxy_connections_active = {active:?}");
    stop.store(true, Ordering::SeqCst);
    for h in load {
        h.join().expect("load thread").expect("load traffic");
    }
    match promtool_check(&under_load) {
        None => println!("note: promtool not installed; skipping `promtool check metrics`"),
        Some(r) => r.unwrap_or_else(|e| panic!("{e}\n--- scraped text ---\n{under_load}")),
    }
    let after = metrics_text(admin);
    assert_no_truncation(&after);
    exit_cleanly(proxy);
}

#[test]
fn admin_routes_status_codes() {
    let echo = echo_server();
    let (proxy, admin) = spawn_with_admin(echo.addr(), &[]);
    for (path, want) in [
        ("/healthz", 200),
        ("/readyz", 200),
        ("/metrics", 200),
        ("/metrics?format=json", 200),
        ("/connections", 200),
        ("/nope", 404),
    ] {
        let (code, _) = http_get(admin, path).unwrap_or_else(|e| panic!("GET {path}: {e}"));
        assert_eq!(code, want, "GET {path}");
    }
    let mut s = TcpStream::connect_timeout(&admin, scaled_secs(10)).expect("connect");
    s.set_read_timeout(Some(scaled_secs(10))).unwrap();
    s.write_all(b"POST /metrics HTTP/1.0\r\nContent-Length: 0\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    let _ = s.read_to_string(&mut raw);
    assert!(
        raw.starts_with("HTTP/1.1 405") || raw.starts_with("HTTP/1.0 405"),
        "POST /metrics: {raw:?}"
    );
    exit_cleanly(proxy);
}

#[test]
fn byte_counters_equal_bytes_sent_and_received() {
    const REPLY_ONE: u64 = 100_000;
    const REPLY_TWO: u64 = 7_777;
    let (srv_one, _ev1) = half_close_server_client_first(REPLY_ONE, 0x11);
    let (srv_two, _ev2) = half_close_server_client_first(REPLY_TWO, 0x22);
    let st = start_cfg(
        "toml",
        2,
        &[],
        true,
        &format!(
            "[[app]]\nname = \"one\"\nlisten = [\"{}\"]\ntargets = [\"{}\"]\n\n\
             [[app]]\nname = \"two\"\nlisten = [\"{}\"]\ntargets = [\"{}\"]\n",
            any_port(1),
            srv_one.addr(),
            any_port(2),
            srv_two.addr()
        ),
    );
    let admin = st.admin.expect("admin");
    let reqs_one = [1000u64, 65_536, 300_001];
    let reqs_two = [12_345u64, 1];
    let (mut up1, mut down1, mut up2, mut down2) = (0u64, 0u64, 0u64, 0u64);
    for (i, &n) in reqs_one.iter().enumerate() {
        let (_c, got) = request_reply(st.app_addr("one"), i as u64, n);
        assert_eq!(got, REPLY_ONE);
        up1 += n;
        down1 += got;
    }
    for (i, &n) in reqs_two.iter().enumerate() {
        let (_c, got) = request_reply(st.app_addr("two"), 100 + i as u64, n);
        assert_eq!(got, REPLY_TWO);
        up2 += n;
        down2 += got;
    }
    wait_app_idle(admin, "one");
    wait_app_idle(admin, "two");
    wait_closes(admin, 5);
    let text = metrics_text(admin);
    let get = |app: &str, dir: &str| {
        metric(
            &text,
            "epoxy_bytes_total",
            &[("app", app), ("direction", dir)],
        )
    };
    assert_eq!(
        get("one", "upstream"),
        Some(up1 as f64),
        "app one upstream bytes"
    );
    assert_eq!(
        get("one", "downstream"),
        Some(down1 as f64),
        "app one downstream bytes"
    );
    assert_eq!(
        get("two", "upstream"),
        Some(up2 as f64),
        "app two upstream bytes"
    );
    assert_eq!(
        get("two", "downstream"),
        Some(down2 as f64),
        "app two downstream bytes"
    );
    assert_eq!(
        metric(&text, "epoxy_connections_total", &[("app", "one")]),
        Some(3.0)
    );
    assert_eq!(
        metric(
            &text,
            "epoxy_closes_total",
            &[("app", "two"), ("reason", "done")]
        ),
        Some(2.0)
    );
    let j = json_get(admin, "/metrics?format=json");
    assert_eq!(
        j["bytes_upstream"].as_u64(),
        Some(up1 + up2),
        "JSON bytes_upstream"
    );
    assert_eq!(
        j["bytes_downstream"].as_u64(),
        Some(down1 + down2),
        "JSON bytes_downstream"
    );
    assert_eq!(
        j["total_connections"].as_u64(),
        Some(5),
        "JSON total_connections"
    );
    let apps = j["apps"].as_array().expect("apps array");
    for (name, up, down) in [("one", up1, down1), ("two", up2, down2)] {
        let a = apps
            .iter()
            .find(|a| a["name"] == name)
            .unwrap_or_else(|| panic!("app {name} missing from JSON"));
        assert_eq!(
            a["bytes_upstream"].as_u64(),
            Some(up),
            "JSON {name} upstream"
        );
        assert_eq!(
            a["bytes_downstream"].as_u64(),
            Some(down),
            "JSON {name} downstream"
        );
    }
    assert_no_truncation(&text);
    let out = exit_cleanly(st.proxy);
    assert_eq!(
        summary_value(&out, "bytes_client_to_upstream"),
        Some(up1 + up2)
    );
    assert_eq!(
        summary_value(&out, "bytes_upstream_to_client"),
        Some(down1 + down2)
    );
}

#[test]
fn json_metrics_parse_and_match_text() {
    let echo = echo_server();
    let dead = dead_port();
    let st = start_cfg(
        "toml",
        2,
        &[],
        true,
        &format!(
            "[[app]]\nname = \"live\"\nlisten = [\"{}\"]\ntargets = [\"{}\", {{ addr = \"{d}\", weight = 2 }}]\n\n\
             [[app]]\nname = \"gone\"\nlisten = [\"{}\"]\ntargets = [\"{d}\"]\n",
            any_port(1),
            echo.addr(),
            any_port(2),
            d = dead.addr()
        ),
    );
    let admin = st.admin.expect("admin");
    for i in 0..6 {
        let mut c = connect(st.app_addr("live"));
        assert_echo(&mut c, &Pattern::bytes(i, 3000 + i as usize));
    }
    for i in 0..2 {
        let mut c = connect(st.app_addr("gone"));
        assert_closed_empty(&mut c, &format!("client {i} of app 'gone' (dead target)"));
    }
    wait_app_idle(admin, "live");
    wait_app_idle(admin, "gone");
    wait_closes(admin, 8);
    // A worker publishes its live-pair gauge after its event batch, a moment after the
    // close freed the app's slot: wait for it too, or the two scrapes below may differ.
    assert!(
        wait_until(scaled_secs(10), || {
            json_get(admin, "/metrics?format=json")["workers"]
                .as_array()
                .is_some_and(|ws| {
                    ws.iter()
                        .all(|w| w["active_connections"].as_u64() == Some(0))
                })
        }),
        "worker gauges never reached 0"
    );
    let j = json_get(admin, "/metrics?format=json");
    let text = metrics_text(admin);
    let num = |v: &Value| -> f64 {
        v.as_f64()
            .or_else(|| v.as_bool().map(|b| if b { 1.0 } else { 0.0 }))
            .unwrap_or_else(|| panic!("not a number: {v}"))
    };
    let m = |name: &str, labels: &[(&str, &str)]| -> f64 {
        metric(&text, name, labels).unwrap_or_else(|| panic!("{name}{labels:?} missing:\n{text}"))
    };
    for k in [
        "active_connections",
        "total_connections",
        "bytes_upstream",
        "bytes_downstream",
    ] {
        assert!(
            j[k].is_u64(),
            "top-level key {k} missing or not a number: {j}"
        );
    }
    let apps = j["apps"].as_array().expect("apps");
    assert_eq!(apps.len(), 2, "apps in JSON");
    let (mut tot, mut up, mut down) = (0.0, 0.0, 0.0);
    let mut checked = 0;
    for a in apps {
        let name = a["name"].as_str().expect("app name");
        let l = [("app", name)];
        assert_eq!(
            num(&a["active_connections"]),
            m("epoxy_connections_active", &l),
            "{name}"
        );
        assert_eq!(
            num(&a["total_connections"]),
            m("epoxy_connections_total", &l),
            "{name}"
        );
        tot += num(&a["total_connections"]);
        let bu = m(
            "epoxy_bytes_total",
            &[("app", name), ("direction", "upstream")],
        );
        let bd = m(
            "epoxy_bytes_total",
            &[("app", name), ("direction", "downstream")],
        );
        assert_eq!(num(&a["bytes_upstream"]), bu, "{name} upstream");
        assert_eq!(num(&a["bytes_downstream"]), bd, "{name} downstream");
        up += bu;
        down += bd;
        for (kind, metric_name) in [
            ("closed", "epoxy_closes_total"),
            ("truncated", "epoxy_truncated_total"),
        ] {
            let obj = a[kind].as_object().expect("reason map");
            assert!(!obj.is_empty());
            for (reason, v) in obj {
                assert_eq!(
                    num(v),
                    m(metric_name, &[("app", name), ("reason", reason)]),
                    "{name} {kind} {reason}"
                );
                checked += 1;
            }
        }
        for t in a["targets"].as_array().expect("targets") {
            let tn = t["name"].as_str().expect("target name");
            let tl = [("app", name), ("target", tn)];
            assert_eq!(num(&t["up"]), m("epoxy_target_up", &tl), "{name}/{tn} up");
            assert_eq!(
                num(&t["active_connections"]),
                m("epoxy_target_connections_active", &tl),
                "{name}/{tn} active"
            );
            for (reason, v) in t["connect_errors"].as_object().expect("errors") {
                assert_eq!(
                    num(v),
                    m(
                        "epoxy_connect_errors_total",
                        &[("app", name), ("target", tn), ("reason", reason)]
                    ),
                    "{name}/{tn} connect errors {reason}"
                );
                checked += 1;
            }
            assert!(t["address"].is_string() && t["weight"].is_u64());
        }
    }
    assert!(checked > 10);
    assert_eq!(
        num(&j["total_connections"]),
        tot,
        "top-level total vs per-app sum"
    );
    assert_eq!(tot, 8.0, "connections total");
    assert_eq!(num(&j["bytes_upstream"]), up);
    assert_eq!(num(&j["bytes_downstream"]), down);
    let gone = apps.iter().find(|a| a["name"] == "gone").expect("app gone");
    assert_eq!(
        gone["closed"]["no_backend"].as_u64(),
        Some(2),
        "no_backend closes of 'gone'"
    );
    for w in j["workers"].as_array().expect("workers") {
        let id = w["worker"].as_u64().expect("worker id").to_string();
        let l = [("worker", id.as_str())];
        assert_eq!(
            num(&w["total_connections"]),
            m("epoxy_worker_connections_total", &l)
        );
        assert_eq!(
            num(&w["active_connections"]),
            m("epoxy_worker_connections_active", &l)
        );
    }
    for (k, r) in [("success", "success"), ("failure", "failure")] {
        assert_eq!(
            num(&j["config_reloads"][k]),
            m("epoxy_config_reloads_total", &[("result", r)])
        );
    }
    exit_cleanly(st.proxy);
}

#[test]
fn connections_lists_live_pair_with_client_address() {
    let echo = echo_server();
    let (proxy, admin) = spawn_with_admin(echo.addr(), &[]);
    let mut c = connect(proxy.addr());
    assert_echo(&mut c, &[5u8; 100]);
    let mut other = connect(proxy.addr());
    assert_echo(&mut other, b"x");
    let me = c.local_addr().expect("local_addr").to_string();
    let list = json_get(admin, "/connections");
    let arr = list.as_array().expect("array");
    assert_eq!(arr.len(), 2, "live pairs listed: {list}");
    let e = arr
        .iter()
        .find(|e| e["client"] == me.as_str())
        .unwrap_or_else(|| panic!("client {me} not listed: {list}"));
    assert_eq!(e["app"], "default", "{e}");
    assert_eq!(e["target"], echo.addr().to_string().as_str(), "{e}");
    assert_eq!(e["bytes_upstream"].as_u64(), Some(100), "{e}");
    assert_eq!(e["bytes_downstream"].as_u64(), Some(100), "{e}");
    assert!(e["age_seconds"].as_f64().is_some_and(|a| a >= 0.0), "{e}");
    assert!(e["state"].is_string() && e["worker"].is_u64(), "{e}");
    drop(c);
    let gone = wait_until(scaled_secs(10), || {
        let l = json_get(admin, "/connections");
        l.as_array()
            .is_some_and(|a| a.len() == 1 && a.iter().all(|e| e["client"] != me.as_str()))
    });
    assert!(gone, "closed pair still listed");
    drop(other);
    exit_cleanly(proxy);
}

// ---------------------------------------------------------------------------------------------
// Drain
// ---------------------------------------------------------------------------------------------

/// Fails unless `/readyz` answers 503 soon (called right after SIGTERM; it takes
/// milliseconds, the bound allows for a loaded machine).
fn assert_readyz_503_soon(admin: SocketAddr) {
    let within = scaled_secs(5);
    assert!(
        wait_until(within, || {
            http_get(admin, "/readyz").is_ok_and(|(code, _)| code == 503)
        }),
        "readyz not 503 within {within:?} of SIGTERM"
    );
}

/// Fails unless the proxy stops accepting on `addr` within `within`: a connect is refused,
/// or the proxy no longer holds a listening socket there (once it lets the port go, anyone
/// may bind it, so a successful connect later proves nothing about the proxy).
fn assert_stops_accepting(p: &ProxyHandle, addr: SocketAddr, within: Duration, why: &str) {
    assert!(
        wait_until(within, || !p.listens_on(addr)
            || try_connect(addr, scaled(Duration::from_millis(500))).is_err()),
        "listener still accepting {within:?} after SIGTERM ({why})"
    );
}

/// Fails unless the proxy closes `c` (no bytes) soon: a client of an app whose targets refuse.
fn assert_closed_empty(c: &mut TcpStream, what: &str) {
    let within = scaled_secs(10);
    match wait_closed(c, within) {
        Ok((_, 0)) => {}
        Ok((how, n)) => panic!("{what}: got {n} bytes before {how:?}"),
        Err(n) => panic!("{what}: still open {within:?} later ({n} bytes received)"),
    }
}

#[test]
fn readyz_turns_503_on_sigterm_while_pair_open() {
    let echo = echo_server();
    // The grace period only has to outlast the test's steps (the proxy exits once the last
    // pair closes), so it is long: a loaded machine must not end it early.
    let (mut proxy, admin) = spawn_with_admin(echo.addr(), &["--grace", "60s"]);
    let addr = proxy.addr();
    assert_eq!(http_get(admin, "/readyz").expect("readyz").0, 200);
    let mut c = connect(addr);
    assert_echo(&mut c, b"before");
    proxy.sigterm();
    let t0 = Instant::now();
    assert_readyz_503_soon(admin);
    println!("readyz 503 after {:?}", t0.elapsed());
    assert_eq!(
        http_get(admin, "/healthz").expect("healthz").0,
        200,
        "healthz while draining"
    );
    let j = json_get(admin, "/metrics?format=json");
    assert_eq!(j["ready"], false, "JSON ready while draining");
    // The live pair keeps working during the grace period; new clients are refused.
    assert_echo(&mut c, b"during drain");
    assert_stops_accepting(&proxy, addr, scaled_secs(10), "drain_delay 0");
    assert!(
        !proxy.has_exited(),
        "exited with a live pair inside the grace period"
    );
    drop(c);
    let st = proxy.wait_exit(scaled_secs(10));
    assert!(
        st.is_some_and(|s| s.success()),
        "proxy did not exit 0 once the last pair closed ({st:?}); stderr:\n{}",
        proxy.stderr_text()
    );
}

#[test]
fn drain_delay_keeps_accepting_after_readyz_503() {
    const DELAY: Duration = Duration::from_secs(5);
    let echo = echo_server();
    let (mut proxy, admin) =
        spawn_with_admin(echo.addr(), &["--drain-delay", "5s", "--grace", "5s"]);
    let addr = proxy.addr();
    // Taken before the signal: the listeners close no sooner than `t0 + DELAY`.
    let t0 = Instant::now();
    proxy.sigterm();
    assert_readyz_503_soon(admin);
    // A connection made well inside the delay (2 s before its end, for the proxy to accept
    // it) must be served. If this machine was too slow to get here in time, the check
    // cannot be made: say so rather than fail.
    if t0.elapsed() < DELAY - Duration::from_secs(2) {
        let mut c = connect(addr);
        assert_echo(&mut c, b"accepted inside drain_delay");
        drop(c);
    } else {
        eprintln!(
            "note: readyz turned 503 only {:?} after SIGTERM; serving inside the drain delay not checked",
            t0.elapsed()
        );
    }
    assert_stops_accepting(&proxy, addr, DELAY + scaled_secs(10), "drain_delay 5s");
    let st = proxy.wait_exit(scaled_secs(15));
    assert!(st.is_some_and(|s| s.success()), "exit status {st:?}");
}

// ---------------------------------------------------------------------------------------------
// Reload
// ---------------------------------------------------------------------------------------------

/// Sends SIGHUP and waits for a new log line containing `needle`.
fn sighup_and_wait(p: &ProxyHandle, needle: &str) {
    let before = p.stderr_text().matches(needle).count();
    send_signal(p.pid(), libc::SIGHUP).expect("SIGHUP");
    let ok = wait_until(scaled_secs(10), || {
        p.stderr_text().matches(needle).count() > before
    });
    assert!(
        ok,
        "no `{needle}` after SIGHUP; stderr:\n{}",
        p.stderr_text()
    );
}

#[test]
fn reload_while_100_connections_stream() {
    let _g = heavy_lock();
    const STREAMS: usize = 100;
    const CHUNK_LEN: usize = 4096;
    let old_target = CountingServer::start();
    let new_target = CountingServer::start();
    // Listeners are port-0 entries told apart by their configured addresses (`any_port`): the
    // reload keeps #1 (same entry), removes #2 and adds #3.
    let cfg = |l: [u8; 2], t: SocketAddr| {
        format!(
            "[[app]]\nname = \"main\"\nlisten = [\"{}\", \"{}\"]\ntargets = [\"{t}\"]\n",
            any_port(l[0]),
            any_port(l[1])
        )
    };
    let st = start_cfg("toml", 2, &[], true, &cfg([1, 2], old_target.addr()));
    let admin = st.admin.expect("admin");
    let (l1, l2) = (st.addr(0), st.addr(1));
    let stop = Arc::new(AtomicBool::new(false));
    let rounds: Arc<Vec<AtomicU64>> = Arc::new((0..STREAMS).map(|_| AtomicU64::new(0)).collect());
    let started = Arc::new(Barrier::new(STREAMS + 1));
    let streams: Vec<_> = (0..STREAMS)
        .map(|i| {
            let (stop, rounds, started) = (stop.clone(), rounds.clone(), started.clone());
            let addr = if i % 2 == 0 { l1 } else { l2 };
            thread::Builder::new()
                .stack_size(256 * 1024)
                .spawn(move || -> Result<u64, String> {
                    let c = try_connect(addr, scaled_secs(10));
                    started.wait();
                    let mut c = c.map_err(|e| format!("stream {i}: connect: {e}"))?;
                    let mut pat = Pattern::new(i as u64);
                    let mut chunk = vec![0u8; CHUNK_LEN];
                    let mut back = vec![0u8; CHUNK_LEN];
                    let mut n = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        pat.fill(&mut chunk);
                        c.write_all(&chunk)
                            .map_err(|e| format!("stream {i}: write after {n} rounds: {e}"))?;
                        read_exact_deadline(&mut c, &mut back, Instant::now() + scaled_secs(20))
                            .map_err(|e| format!("stream {i}: read after {n} rounds: {e}"))?;
                        if back != chunk {
                            return Err(format!("stream {i}: corrupted echo in round {n}"));
                        }
                        n += 1;
                        rounds[i].store(n, Ordering::SeqCst);
                    }
                    c.shutdown(Shutdown::Write)
                        .map_err(|e| format!("stream {i}: shutdown: {e}"))?;
                    match wait_closed(&mut c, scaled_secs(20)) {
                        Ok((Closed::Eof, 0)) => Ok(n),
                        other => Err(format!("stream {i}: end after {n} rounds: {other:?}")),
                    }
                })
                .expect("spawn stream")
        })
        .collect();
    started.wait();
    let all_flowing = |min: &[u64]| {
        wait_until(scaled_secs(30), || {
            (0..STREAMS).all(|i| rounds[i].load(Ordering::SeqCst) > min[i])
        })
    };
    assert!(
        all_flowing(&[0; STREAMS]),
        "not all 100 streams are flowing"
    );
    assert_eq!(old_target.accepted(), STREAMS);
    // Reload: L2 removed, L3 added, the target list changed.
    let added = st.reload(&cfg([1, 3], new_target.addr()));
    let at_reload: Vec<u64> = (0..STREAMS)
        .map(|i| rounds[i].load(Ordering::SeqCst))
        .collect();
    let want_ip: std::net::IpAddr = [127, 0, 0, 3].into();
    let l3 = added
        .iter()
        .find(|l| l.app == "main" && l.addr.ip() == want_ip)
        .unwrap_or_else(|| panic!("the reload logged no new listener on {want_ip}: {added:?}"))
        .connect_addr();
    assert_ne!(l3.port(), 0);
    // The new listener serves, through the new target.
    let mut c3 = connect(l3);
    assert_echo(&mut c3, b"new listener");
    // New connections on the kept listener use the new target list.
    let mut c1 = connect(l1);
    assert_echo(&mut c1, b"kept listener");
    assert_eq!(
        new_target.accepted(),
        2,
        "new connections did not go to the new target"
    );
    assert_eq!(
        old_target.accepted(),
        STREAMS,
        "a new connection went to the old target"
    );
    // The removed listener is closed: the proxy holds no listening socket there any more
    // (seen in /proc; once released, the port is anyone's, so a refused connect is not
    // something to wait for).
    assert!(
        wait_until(scaled_secs(10), || !st.proxy.listens_on(l2)),
        "removed listener {l2} is still open"
    );
    // Every live stream keeps flowing after the reload, including those of the removed listener.
    assert!(
        all_flowing(&at_reload),
        "some streams stalled after the reload"
    );
    stop.store(true, Ordering::SeqCst);
    let mut broken = Vec::new();
    let mut total_rounds = 0;
    for h in streams {
        match h.join().expect("stream thread") {
            Ok(n) => total_rounds += n,
            Err(e) => broken.push(e),
        }
    }
    assert!(
        broken.is_empty(),
        "{} broken streams: {broken:?}",
        broken.len()
    );
    println!("reload under load: {STREAMS} streams, {total_rounds} verified echo rounds");
    drop((c1, c3));
    wait_app_idle(admin, "main");
    wait_closes(admin, STREAMS as u64 + 2);
    let text = metrics_text(admin);
    assert_no_truncation(&text);
    assert_eq!(
        metric(
            &text,
            "epoxy_config_reloads_total",
            &[("result", "success")]
        ),
        Some(1.0)
    );
    for reason in [
        "client_reset",
        "upstream_reset",
        "client_error",
        "upstream_error",
    ] {
        assert_eq!(
            metric(
                &text,
                "epoxy_closes_total",
                &[("app", "main"), ("reason", reason)]
            ),
            Some(0.0),
            "closes with reason {reason}"
        );
    }
    let out = exit_cleanly(st.proxy);
    assert_eq!(summary_value(&out, "accepted"), Some(STREAMS as u64 + 2));
}

#[test]
fn invalid_reload_keeps_old_config_serving() {
    let echo = echo_server();
    let st = start_one_app("keep", true, &format!("targets = [\"{}\"]\n", echo.addr()));
    let admin = st.admin.expect("admin");
    let addr = st.addr(0);
    let mut live = connect(addr);
    assert_echo(&mut live, b"before");
    st.file.write("this is [not toml at all\n");
    sighup_and_wait(&st.proxy, "reload failed");
    // An unknown key is invalid too.
    st.file.write(&format!(
        "[[app]]\nname = \"keep\"\nlisten = [\"{}\"]\ntargets = [\"{}\"]\nbogus_key = 1\n",
        any_port(1),
        echo.addr()
    ));
    sighup_and_wait(&st.proxy, "reload failed");
    let text = metrics_text(admin);
    assert_eq!(
        metric(
            &text,
            "epoxy_config_reloads_total",
            &[("result", "failure")]
        ),
        Some(2.0),
        "failed reloads"
    );
    assert_eq!(
        metric(
            &text,
            "epoxy_config_reloads_total",
            &[("result", "success")]
        ),
        Some(0.0)
    );
    assert_echo(&mut live, b"live pair after failed reloads");
    let mut fresh = connect(addr);
    assert_echo(&mut fresh, b"new pair after failed reloads");
    assert_eq!(http_get(admin, "/readyz").expect("readyz").0, 200);
    let j = json_get(admin, "/metrics?format=json");
    assert_eq!(j["config_reloads"]["failure"].as_u64(), Some(2));
    drop((live, fresh));
    exit_cleanly(st.proxy);
}

// ---------------------------------------------------------------------------------------------
// Access log and truncation
// ---------------------------------------------------------------------------------------------

/// One parsed access-log line.
#[derive(Debug)]
struct Access {
    client: String,
    start: String,
    app: String,
    target: String,
    connect_ms: u64,
    duration_ms: u64,
    up: u64,
    down: u64,
    reason: String,
}

fn parse_access(line: &str) -> Option<Access> {
    let i = line.find(" access] ")?;
    let f: Vec<&str> = line[i + " access] ".len()..].split_whitespace().collect();
    if f.len() != 8 {
        return None;
    }
    let start = f[1].strip_prefix('[')?.strip_suffix(']')?.to_string();
    let (c, d) = f[4].split_once('/')?;
    Some(Access {
        client: f[0].to_string(),
        start,
        app: f[2].to_string(),
        target: f[3].to_string(),
        connect_ms: c.parse().ok()?,
        duration_ms: d.parse().ok()?,
        up: f[5].parse().ok()?,
        down: f[6].parse().ok()?,
        reason: f[7].to_string(),
    })
}

#[test]
fn access_log_lines_carry_byte_counts() {
    const REPLY: u64 = 5000;
    let (srv, _ev) = half_close_server_client_first(REPLY, 0x33);
    let dead = dead_port();
    let st = start_cfg(
        "toml",
        2,
        &["--access-log"],
        false,
        &format!(
            "[[app]]\nname = \"logged\"\nlisten = [\"{}\"]\ntargets = [\"{}\"]\n\n\
             [[app]]\nname = \"nowhere\"\nlisten = [\"{}\"]\ntargets = [\"{}\"]\n",
            any_port(1),
            srv.addr(),
            any_port(2),
            dead.addr()
        ),
    );
    let mut expect = Vec::new();
    for (i, n) in [10u64, 2000, 70_000].into_iter().enumerate() {
        let (c, got) = request_reply(st.app_addr("logged"), i as u64, n);
        assert_eq!(got, REPLY);
        expect.push((c.local_addr().expect("addr").to_string(), n));
    }
    let mut d = connect(st.app_addr("nowhere"));
    let dead_client = d.local_addr().expect("addr").to_string();
    assert_closed_empty(&mut d, "client of app 'nowhere' (dead target)");
    let lines = || -> Vec<String> {
        st.proxy
            .stderr_text()
            .lines()
            .filter(|l| l.contains(" access] "))
            .map(str::to_string)
            .collect()
    };
    assert!(
        wait_until(scaled_secs(10), || lines().len() >= 4),
        "expected 4 access-log lines; stderr:\n{}",
        st.proxy.stderr_text()
    );
    let parsed: Vec<Access> = lines()
        .iter()
        .map(|l| parse_access(l).unwrap_or_else(|| panic!("unparsable access line: {l}")))
        .collect();
    assert_eq!(parsed.len(), 4, "{parsed:?}");
    let max_ms = scaled_secs(10).as_millis();
    for a in &parsed {
        let b = a.start.as_bytes();
        assert!(
            a.start.len() == 24
                && b[4] == b'-'
                && b[10] == b'T'
                && b[19] == b'.'
                && a.start.ends_with('Z'),
            "start time not RFC 3339 with ms: {a:?}"
        );
        assert!(
            a.connect_ms <= a.duration_ms && u128::from(a.duration_ms) < max_ms,
            "{a:?}"
        );
    }
    for (client, n) in &expect {
        let a = parsed
            .iter()
            .find(|a| &a.client == client)
            .unwrap_or_else(|| panic!("no access line for {client}: {parsed:?}"));
        assert_eq!(a.app, "logged", "{a:?}");
        assert_eq!(a.target, srv.addr().to_string(), "{a:?}");
        assert_eq!(a.up, *n, "bytes up: {a:?}");
        assert_eq!(a.down, REPLY, "bytes down: {a:?}");
        assert_eq!(a.reason, "done", "{a:?}");
    }
    let a = parsed
        .iter()
        .find(|a| a.client == dead_client)
        .unwrap_or_else(|| panic!("no access line for {dead_client}: {parsed:?}"));
    assert_eq!(
        (a.app.as_str(), a.target.as_str()),
        ("nowhere", "-"),
        "{a:?}"
    );
    assert_eq!((a.up, a.down), (0, 0), "{a:?}");
    assert_eq!(a.reason, "no_backend", "{a:?}");
    exit_cleanly(st.proxy);
}

#[test]
fn truncation_counter_zero_after_mixed_traffic() {
    let echo = echo_server();
    let (cf, _e1) = half_close_server_client_first(300_000, 0x44);
    let (uf, _e2) = half_close_server_upstream_first(200_000, 0x55);
    let (src, _) = source_server(1 << 20, 0x66);
    let st = start_cfg(
        "toml",
        4,
        &[],
        true,
        &format!(
            "[[app]]\nname = \"echo\"\nlisten = [\"{}\"]\ntargets = [\"{}\"]\n\n\
             [[app]]\nname = \"cfirst\"\nlisten = [\"{}\"]\ntargets = [\"{}\"]\n\n\
             [[app]]\nname = \"ufirst\"\nlisten = [\"{}\"]\ntargets = [\"{}\"]\n\n\
             [[app]]\nname = \"source\"\nlisten = [\"{}\"]\ntargets = [\"{}\"]\n",
            any_port(1),
            echo.addr(),
            any_port(2),
            cf.addr(),
            any_port(3),
            uf.addr(),
            any_port(4),
            src.addr()
        ),
    );
    let admin = st.admin.expect("admin");
    let mut conns = 0u64;
    // Echo of several sizes, then a clean half-close.
    for i in 0..5u64 {
        let mut c = connect(st.app_addr("echo"));
        for k in 0..4 {
            assert_echo(
                &mut c,
                &Pattern::bytes(i * 10 + k, 1 + (k as usize) * 40_000),
            );
        }
        c.shutdown(Shutdown::Write).expect("shutdown");
        let end = wait_closed(&mut c, scaled_secs(10));
        assert!(
            matches!(end, Ok((Closed::Eof, 0))),
            "echo pair ended with {end:?}"
        );
        conns += 1;
    }
    // Client half-closes first, then the upstream answers.
    for i in 0..3u64 {
        let (_c, got) = request_reply(st.app_addr("cfirst"), i, 50_000 * (i + 1));
        assert_eq!(got, 300_000);
        conns += 1;
    }
    // Upstream half-closes first, then the client sends and closes.
    for i in 0..3u64 {
        let mut c = connect(st.app_addr("ufirst"));
        let (len, h) = read_to_eof_hash(&mut c, Instant::now() + scaled_secs(30)).expect("read");
        assert_eq!(len, 200_000);
        assert!(h == pattern_hash(0x55, 200_000));
        write_pattern(&mut c, i, 100_000).expect("write after upstream EOF");
        c.shutdown(Shutdown::Write).expect("shutdown");
        conns += 1;
    }
    // Downloads.
    for _ in 0..2 {
        let mut c = connect(st.app_addr("source"));
        c.shutdown(Shutdown::Write).expect("shutdown");
        let (len, _) = read_to_eof_hash(&mut c, Instant::now() + scaled_secs(30)).expect("read");
        assert_eq!(len, 1 << 20);
        conns += 1;
    }
    for app in ["echo", "cfirst", "ufirst", "source"] {
        wait_app_idle(admin, app);
    }
    wait_closes(admin, conns);
    let text = metrics_text(admin);
    assert_no_truncation(&text);
    let closes: f64 = samples(&text, "epoxy_closes_total")
        .iter()
        .map(|(_, v)| v)
        .sum();
    assert_eq!(closes, conns as f64, "closed pairs vs connections made");
    let done: f64 = samples(&text, "epoxy_closes_total")
        .iter()
        .filter(|(l, _)| l.iter().any(|(k, v)| k == "reason" && v == "done"))
        .map(|(_, v)| v)
        .sum();
    assert_eq!(
        done, conns as f64,
        "every pair should close as done:\n{text}"
    );
    let j = json_get(admin, "/metrics?format=json");
    for a in j["apps"].as_array().expect("apps") {
        for (reason, v) in a["truncated"].as_object().expect("truncated") {
            assert_eq!(v.as_u64(), Some(0), "app {} truncated {reason}", a["name"]);
        }
    }
    exit_cleanly(st.proxy);
}
