//! The admin endpoint under abuse (issue 13): a local client that opens a thousand idle
//! connections, sends half a request, an oversized header or garbage. The admin must keep a
//! fixed thread count and bounded memory, keep answering `/metrics` within a second, close
//! what never completes, answer 431/400, and never take the file descriptors that the
//! proxied connections need (`max_conns` holds in full meanwhile).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use crate::util::*;

/// Threads of `pid` (from /proc/PID/status).
fn threads_of(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Threads:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// Send `bytes` on a fresh admin connection and read the answer until EOF (or `within`).
fn raw_exchange(admin: SocketAddr, bytes: &[u8], within: Duration) -> (String, Duration) {
    let mut s = TcpStream::connect_timeout(&admin, Duration::from_secs(2)).expect("connect admin");
    s.set_read_timeout(Some(within)).expect("timeout");
    let t0 = Instant::now();
    // The server may answer (and stop reading) before all of a large request is written.
    let _ = s.write_all(bytes);
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    (String::from_utf8_lossy(&raw).into_owned(), t0.elapsed())
}

/// A proxy with a low open-files limit (so that every fd counts), an admin endpoint and an
/// echo backend.
fn low_fd_proxy(echo: &Server, nofile: u64) -> (ProxyHandle, SocketAddr) {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!("ulimit -n {nofile} && exec \"$0\" \"$@\""))
        .arg(PROXY_BIN)
        .args(proxy_args(
            echo.addr(),
            &["--admin", "127.0.0.1:0", "--log-interval", "off"],
        ));
    let p = spawn_proxy_cmd(cmd);
    assert!(
        p.wait_stderr_contains("admin endpoint on", Duration::from_secs(5)),
        "no admin line; stderr:\n{}",
        p.stderr_text()
    );
    let admin = admin_addr_of(&p.stderr_text()).expect("admin address");
    (p, admin)
}

#[test]
fn a_thousand_idle_admin_connections_leave_threads_memory_and_max_conns_alone() {
    let _heavy = heavy_lock();
    let echo = echo_server();
    let (proxy, admin) = low_fd_proxy(&echo, 512);
    let pid = proxy.pid();
    let text = metrics_text(admin);
    let max_conns = metric(&text, "epoxy_max_connections", &[]).expect("max_connections") as usize;
    // 512 fds: 32 kept back, one listener, the admin's budget of 68, then per relay mode
    // (`EPOXY_TEST_SPLICE`): the pipes of splice = "auto" (64 per worker, 2 fds each, times
    // `EPOXY_TEST_WORKERS`) and two per pair; none with `--no-splice`; with `--splice` 2.5
    // per pair (a pipe per 4 pairs).
    let usable = 512 - 32 - 1 - 68;
    let expected = match test_splice() {
        TestSplice::Off => usable / 2,
        TestSplice::On => usable * 2 / 5,
        TestSplice::Auto => {
            let workers = test_workers().unwrap_or(1);
            (usable - 2 * epoxy::control::AUTO_PIPES_PER_WORKER * workers) / 2
        }
    };
    assert_eq!(max_conns, expected, "{text}");
    let threads_before = threads_of(pid);
    let rss_before = proc_rss_kib(pid).unwrap_or(0);

    // A thousand idle connections that never send a byte.
    let mut idle = Vec::with_capacity(1000);
    for i in 0..1000 {
        match TcpStream::connect_timeout(&admin, Duration::from_secs(5)) {
            Ok(s) => idle.push(s),
            Err(e) => panic!("idle connection {i}: {e}"),
        }
    }
    // /metrics answers within a second while they are open.
    for _ in 0..3 {
        let t0 = Instant::now();
        let (code, _) = http_get(admin, "/metrics").expect("GET /metrics under load");
        let took = t0.elapsed();
        assert_eq!(code, 200);
        assert!(took < Duration::from_secs(1), "GET /metrics took {took:?}");
    }
    let threads_after = threads_of(pid);
    let rss_after = proc_rss_kib(pid).unwrap_or(0);
    let fds = proc_fd_count(pid).unwrap_or(0);
    eprintln!(
        "admin with 1000 idle connections: threads {threads_before} -> {threads_after}, RSS {rss_before} -> {rss_after} KiB, fds {fds}"
    );
    assert_eq!(threads_after, threads_before, "admin threads must be fixed");
    assert!(
        rss_after < rss_before + 8 * 1024,
        "RSS grew from {rss_before} to {rss_after} KiB"
    );
    assert!(fds < 32 + 68 + 10, "the admin holds {fds} fds");

    // Proxied traffic keeps its full max_conns meanwhile.
    let mut pairs = Vec::with_capacity(max_conns);
    for i in 0..max_conns {
        let mut c = connect(proxy.addr());
        let msg = format!("pair {i}\n");
        assert_echo(&mut c, msg.as_bytes());
        pairs.push(c);
    }
    let text = metrics_text(admin);
    assert_eq!(
        metric(&text, "epoxy_connections_active", &[("app", "default")]),
        Some(max_conns as f64)
    );
    assert_eq!(
        metric(&text, "epoxy_accept_pauses_total", &[("cause", "emfile")]),
        Some(0.0),
        "no EMFILE while the admin is flooded"
    );
    let evicted = metric(
        &text,
        "epoxy_admin_rejected_total",
        &[("reason", "evicted")],
    );
    assert!(evicted.is_some_and(|n| n >= 900.0), "evicted: {evicted:?}");
    drop(idle);
    drop(pairs);
    exit_cleanly(proxy);
}

#[test]
fn a_half_sent_request_is_closed_by_the_timeout() {
    let echo = echo_server();
    let (proxy, admin) = spawn_with_admin(echo.addr(), &[]);
    let (raw, took) = raw_exchange(
        admin,
        b"GET /metrics HTTP/1.1\r\nHost: loc",
        Duration::from_secs(20),
    );
    assert!(raw.starts_with("HTTP/1.1 408 "), "{raw:?}");
    assert!(
        took >= Duration::from_millis(4500) && took < Duration::from_secs(15),
        "closed after {took:?}"
    );
    // A connection that sends nothing at all is closed the same way.
    let (raw, took) = raw_exchange(admin, b"", Duration::from_secs(20));
    assert!(raw.starts_with("HTTP/1.1 408 "), "{raw:?} after {took:?}");
    exit_cleanly(proxy);
}

#[test]
fn oversized_and_garbage_requests_are_refused() {
    let echo = echo_server();
    let (proxy, admin) = spawn_with_admin(echo.addr(), &[]);
    let within = Duration::from_secs(10);
    let mut big = b"GET /metrics HTTP/1.1\r\nX-Big: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', 1 << 20));
    big.extend_from_slice(b"\r\n\r\n");
    let (raw, _) = raw_exchange(admin, &big, within);
    assert!(
        raw.starts_with("HTTP/1.1 431 ") || raw.starts_with("HTTP/1.1 400 "),
        "1 MB header: {:?}",
        &raw[..raw.len().min(200)]
    );
    let long_line = format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(64 * 1024));
    let (raw, _) = raw_exchange(admin, long_line.as_bytes(), within);
    assert!(
        raw.starts_with("HTTP/1.1 414 "),
        "long request line: {raw:?}"
    );
    for garbage in [
        &b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03"[..],
        b"hello\r\n\r\n",
        b"GET /metrics\r\n\r\n",
        b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n",
    ] {
        let (raw, took) = raw_exchange(admin, garbage, within);
        assert!(raw.starts_with("HTTP/1.1 400 "), "{garbage:?}: {raw:?}");
        assert!(took < Duration::from_secs(2), "{garbage:?} took {took:?}");
    }
    // The endpoint still serves, and counted what it refused.
    let text = metrics_text(admin);
    assert!(
        metric(
            &text,
            "epoxy_admin_rejected_total",
            &[("reason", "bad_request")]
        ) >= Some(4.0)
    );
    assert!(
        metric(
            &text,
            "epoxy_admin_rejected_total",
            &[("reason", "too_large")]
        ) >= Some(2.0)
    );
    let (code, _) = http_get(admin, "/healthz").expect("healthz");
    assert_eq!(code, 200);
    exit_cleanly(proxy);
}
