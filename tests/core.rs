//! Core behaviour of the `proxy` binary (issue 2): relaying with integrity, half-close,
//! resets, backpressure, fd hygiene, IPv6, fd exhaustion, admission limits, idle timeout,
//! signals, CLI errors and the shutdown summary.
//!
//! Every test owns its servers and its proxy (port 0 everywhere, or a port it holds) and
//! bounds every wait with a scaled deadline (`EPOXY_TEST_TIME_SCALE`).

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::util::*;

const MIB: u64 = 1 << 20;

fn exit_code(st: Option<std::process::ExitStatus>) -> Option<i32> {
    st.and_then(|s| s.code())
}

// ---------------------------------------------------------------------------------------------
// Relaying
// ---------------------------------------------------------------------------------------------

#[test]
fn echo_roundtrip() {
    let echo = echo_server();
    let proxy = spawn_proxy_to(echo.addr(), &[]);
    let mut c = connect(proxy.addr());
    assert_echo(&mut c, b"hello, epoxy\n");
    for i in 0..20u64 {
        let msg = Pattern::bytes(i, 16 * 1024 + i as usize);
        assert_echo(&mut c, &msg);
    }
    c.shutdown(Shutdown::Write).expect("shutdown");
    match wait_closed(&mut c, scaled_secs(10)) {
        Ok((Closed::Eof, 0)) => {}
        other => panic!("expected a clean EOF after our shutdown, got {other:?}"),
    }
    assert_eq!(
        echo.accepted(),
        1,
        "one client connection = one upstream connection"
    );
}

#[test]
fn duplex_64mib_each_direction_sha256() {
    let _g = heavy_lock();
    const LEN: u64 = 64 * MIB;
    let (srv, reports) = duplex_server(LEN, 0xD0D0);
    let proxy = spawn_proxy_to(srv.addr(), &[]);
    let c = connect(proxy.addr());
    let mut w = c.try_clone().expect("clone");
    let writer = thread::spawn(move || {
        let h = write_pattern(&mut w, 0xC1C1, LEN);
        let _ = w.shutdown(Shutdown::Write);
        h
    });
    let mut r = c;
    let (len, hash) =
        read_to_eof_hash(&mut r, Instant::now() + scaled_secs(120)).expect("client read");
    let sent = writer.join().expect("writer thread").expect("client write");
    let rep = reports
        .recv_timeout(scaled_secs(30))
        .expect("server report");
    assert_eq!(len, LEN, "client received {len} of {LEN} bytes");
    assert_eq!(rep.sent_len, LEN, "server failed writing");
    assert!(
        hash == rep.sent_hash,
        "upstream->client bytes differ: got {} want {}",
        hex(&hash),
        hex(&rep.sent_hash)
    );
    assert_eq!(rep.recv_error, None, "server read ended with an error");
    assert_eq!(
        rep.recv_len, LEN,
        "server received {} of {LEN} bytes",
        rep.recv_len
    );
    assert!(
        rep.recv_hash == sent,
        "client->upstream bytes differ: got {} want {}",
        hex(&rep.recv_hash),
        hex(&sent)
    );
}

#[test]
fn half_close_client_to_upstream() {
    const REQ: u64 = 256 * 1024;
    const REPLY: u64 = MIB;
    let (srv, events) = half_close_server_client_first(REPLY, 0xA2);
    let proxy = spawn_proxy_to(srv.addr(), &[]);
    let mut c = connect(proxy.addr());
    let sent = write_pattern(&mut c, 0xA1, REQ).expect("write request");
    c.shutdown(Shutdown::Write).expect("shutdown(Write)");
    // The upstream must see EOF (our half-close forwarded) with every byte before it.
    let ev = wait_event(&events, scaled_secs(10), |e| {
        matches!(e, Event::RecvHash(..) | Event::ReadEnded(..))
    });
    match ev {
        Some((_, Event::RecvHash(len, h))) => {
            assert_eq!(len, REQ, "upstream got {len} of {REQ} bytes before EOF");
            assert!(h == sent, "upstream got different bytes");
        }
        other => panic!("upstream did not see a clean EOF in time: {other:?}"),
    }
    // The other direction keeps flowing after our half-close.
    let (len, h) = read_to_eof_hash(&mut c, Instant::now() + scaled_secs(30)).expect("read reply");
    assert_eq!(len, REPLY, "client got {len} of {REPLY} reply bytes");
    assert!(h == pattern_hash(0xA2, REPLY), "reply bytes differ");
}

#[test]
fn half_close_upstream_to_client() {
    const FIRST: u64 = MIB;
    const AFTER: u64 = 256 * 1024;
    let (srv, events) = half_close_server_upstream_first(FIRST, 0xB2);
    let proxy = spawn_proxy_to(srv.addr(), &[]);
    let mut c = connect(proxy.addr());
    // Upstream writes and half-closes first: we must see all of it, then EOF.
    let (len, h) =
        read_to_eof_hash(&mut c, Instant::now() + scaled_secs(30)).expect("read upstream data");
    assert_eq!(len, FIRST, "client got {len} of {FIRST} bytes before EOF");
    assert!(
        h == pattern_hash(0xB2, FIRST),
        "upstream->client bytes differ"
    );
    // Our direction still works after the upstream's half-close.
    let sent = write_pattern(&mut c, 0xB1, AFTER).expect("write after upstream EOF");
    c.shutdown(Shutdown::Write).expect("shutdown(Write)");
    let ev = wait_event(&events, scaled_secs(10), |e| {
        matches!(e, Event::RecvHash(..) | Event::ReadEnded(..))
    });
    match ev {
        Some((_, Event::RecvHash(len, h))) => {
            assert_eq!(
                len, AFTER,
                "upstream got {len} of {AFTER} bytes after its half-close"
            );
            assert!(h == sent, "client->upstream bytes differ");
        }
        other => panic!("upstream did not get our bytes and EOF in time: {other:?}"),
    }
    // Both directions are done: the proxy closes the pair.
    match wait_closed(&mut c, scaled_secs(10)) {
        Ok((_, 0)) => {}
        other => panic!("client not closed after both directions finished: {other:?}"),
    }
}

#[test]
fn thousand_concurrent_connections_echo_64kib() {
    let _g = heavy_lock();
    const CONNS: usize = 1000;
    const THREADS: usize = 8;
    const PER_CONN: usize = 64 * 1024;
    const STEP: usize = 8 * 1024;
    let wait = scaled_secs(60);
    let echo = echo_server();
    let proxy = spawn_proxy_to(echo.addr(), &[]);
    let addr = proxy.addr();

    let connected = Arc::new(AtomicUsize::new(0));
    let first_round = Arc::new(AtomicUsize::new(0));
    let go_on = Arc::new(AtomicBool::new(false));
    let finished = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    let mut workers = Vec::new();
    for t in 0..THREADS {
        let (connected, first_round, go_on, finished, failed) = (
            Arc::clone(&connected),
            Arc::clone(&first_round),
            Arc::clone(&go_on),
            Arc::clone(&finished),
            Arc::clone(&failed),
        );
        let h = thread::Builder::new()
            .name(format!("c1000-{t}"))
            .spawn(move || -> Result<u64, String> {
                let n = CONNS / THREADS;
                let mut socks = Vec::with_capacity(n);
                let mut pats = Vec::with_capacity(n);
                for i in 0..n {
                    let s = try_connect(addr, scaled_secs(10))
                        .map_err(|e| format!("connect #{i}: {e}"))?;
                    socks.push(s);
                    pats.push(Pattern::new((t * n + i) as u64 + 1000));
                }
                connected.fetch_add(1, Ordering::SeqCst);
                // All 1000 connections are open before any data moves.
                let all =
                    || connected.load(Ordering::SeqCst) == THREADS || failed.load(Ordering::SeqCst);
                if !wait_until(wait, all) || failed.load(Ordering::SeqCst) {
                    return Err("peers did not connect".into());
                }
                let mut chunks = vec![vec![0u8; STEP]; n];
                let mut back = vec![0u8; STEP];
                let mut bytes = 0u64;
                for round in 0..PER_CONN / STEP {
                    for (i, s) in socks.iter_mut().enumerate() {
                        pats[i].fill(&mut chunks[i]);
                        s.write_all(&chunks[i])
                            .map_err(|e| format!("write conn {i} round {round}: {e}"))?;
                    }
                    let deadline = Instant::now() + wait;
                    for (i, s) in socks.iter_mut().enumerate() {
                        read_exact_deadline(s, &mut back, deadline)
                            .map_err(|e| format!("read conn {i} round {round}: {e}"))?;
                        if back != chunks[i] {
                            return Err(format!("conn {i} round {round}: echoed bytes differ"));
                        }
                        bytes += STEP as u64;
                    }
                    if round == 0 {
                        first_round.fetch_add(1, Ordering::SeqCst);
                        let go = || go_on.load(Ordering::SeqCst) || failed.load(Ordering::SeqCst);
                        if !wait_until(wait, go) || failed.load(Ordering::SeqCst) {
                            return Err("main thread did not release us".into());
                        }
                    }
                }
                finished.fetch_add(1, Ordering::SeqCst);
                // Keep the sockets open until every thread is done, then close them all.
                let done =
                    || finished.load(Ordering::SeqCst) == THREADS || failed.load(Ordering::SeqCst);
                if !wait_until(wait, done) {
                    return Err("peers did not finish".into());
                }
                Ok(bytes)
            })
            .expect("spawn client thread");
        workers.push(h);
    }
    // Once every connection has echoed once, the proxy holds all pairs at the same time.
    let all_first = wait_until(wait, || {
        first_round.load(Ordering::SeqCst) == THREADS || workers.iter().any(|w| w.is_finished())
    });
    let fds_at_peak = proxy.fd_count();
    go_on.store(true, Ordering::SeqCst);
    let mut total = 0u64;
    let mut errors = Vec::new();
    for w in workers {
        match w.join() {
            Ok(Ok(b)) => total += b,
            Ok(Err(e)) => {
                failed.store(true, Ordering::SeqCst);
                errors.push(e)
            }
            Err(_) => {
                failed.store(true, Ordering::SeqCst);
                errors.push("client thread panicked".into())
            }
        }
    }
    assert!(errors.is_empty(), "client errors: {errors:?}");
    assert!(all_first, "first round did not complete on all connections");
    assert_eq!(total, (CONNS * PER_CONN) as u64);
    assert!(
        fds_at_peak >= 2 * CONNS,
        "proxy held only {fds_at_peak} fds while {CONNS} pairs were open"
    );
    assert!(
        echo.accepted() >= CONNS,
        "upstream saw {} connections",
        echo.accepted()
    );
}

// ---------------------------------------------------------------------------------------------
// Failures of either side
// ---------------------------------------------------------------------------------------------

#[test]
fn backend_refused_closes_client_then_recovers() {
    // The backend's port is held for the whole test (nothing else can take it), refusing
    // connections until a server listens on it.
    let backend = dead_port();
    let mut proxy = spawn_proxy_to(backend.addr(), &[]);
    let mut c = connect(proxy.addr());
    let _ = c.write_all(b"anyone there?");
    let within = scaled_secs(10);
    match wait_closed(&mut c, within) {
        Ok((_, n)) => assert_eq!(n, 0, "client got {n} bytes from nowhere"),
        Err(_) => panic!("client still open {within:?} after the backend refused"),
    }
    drop(c);
    // The backend comes back on the same port: the next connection is served.
    let echo = echo_server_held(&backend);
    let mut c2 = connect(proxy.addr());
    assert_echo(&mut c2, b"back again");
    drop(c2);
    assert_eq!(echo.accepted(), 1);
    proxy.sigterm();
    let st = proxy.wait_exit(scaled_secs(15));
    assert_eq!(exit_code(st), Some(0), "stderr:\n{}", proxy.stderr_text());
    let refused = proxy.summary_sub("connect_failures", "refused");
    assert!(
        refused.is_some_and(|r| r >= 1),
        "summary does not count the refused connect; stderr:\n{}",
        proxy.stderr_text()
    );
}

#[test]
fn backend_reset_mid_stream_closes_client() {
    upstream_reset_reaches_client(&[], 0x7E);
}

/// Regression: a target that resets right after accepting, before the proxy handled its
/// connect completion, used to count as a failed connect, and the client then got a plain
/// close after zero bytes (an "empty, complete reply"; the 1-in-5 flake of the test above
/// under load). Either order of reset and connect event must reach the client as a reset.
#[test]
fn upstream_reset_right_after_accept_reaches_client_as_reset() {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let backend = l.local_addr().expect("addr");
    let stop = Arc::new(AtomicBool::new(false));
    let stop2 = stop.clone();
    // Accept and reset at once, on this thread (no spawn): often before the proxy looks.
    let t = thread::spawn(move || {
        l.set_nonblocking(true).expect("nonblocking");
        while !stop2.load(Ordering::Relaxed) {
            match l.accept() {
                Ok((s, _)) => reset_close(s),
                Err(_) => thread::sleep(Duration::from_millis(1)),
            }
        }
    });
    let proxy = spawn_proxy_to(backend, &[]);
    // 100 clients queue in the listener's backlog while the proxy is stopped; resumed, it
    // accepts them in one burst and starts 100 connects before it polls again, by which time
    // the first targets have reset: their connect events come with ECONNRESET.
    stop_process(proxy.pid(), scaled_secs(10)).expect("SIGSTOP");
    let mut clients: Vec<TcpStream> = (0..100).map(|_| connect(proxy.addr())).collect();
    send_signal(proxy.pid(), libc::SIGCONT).expect("SIGCONT");
    for (i, c) in clients.iter_mut().enumerate() {
        match wait_closed(c, scaled_secs(10)) {
            Ok((Closed::Reset, 0)) => {}
            other => panic!("client {i}: saw {other:?}, not a reset"),
        }
    }
    stop.store(true, Ordering::Relaxed);
    let _ = t.join();
}

#[test]
fn client_reset_closes_upstream() {
    let (srv, events) = scripted_server(|mut s, report| {
        let mut buf = vec![0u8; CHUNK];
        let mut total = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => {
                    report(Event::ReadEnded(None, total));
                    return;
                }
                Ok(n) => {
                    if total == 0 {
                        report(Event::GotData(n as u64));
                    }
                    total += n as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    report(Event::ReadEnded(Some(e.kind()), total));
                    return;
                }
            }
        }
    });
    let proxy = spawn_proxy_to(srv.addr(), &[]);
    let mut c = connect(proxy.addr());
    c.write_all(&[7u8; 1000]).expect("write");
    assert!(
        wait_event(&events, scaled_secs(10), |e| matches!(e, Event::GotData(_))).is_some(),
        "upstream never got our bytes"
    );
    reset_close(c);
    let t0 = Instant::now();
    // Milliseconds normally; the bound allows for a loaded 2-core machine.
    let within = scaled_secs(10);
    let ev = wait_event(&events, within, |e| matches!(e, Event::ReadEnded(..)));
    match ev {
        Some((t, Event::ReadEnded(kind, _))) => {
            let dt = t.saturating_duration_since(t0);
            assert!(dt <= within, "upstream saw the end after {dt:?}");
            assert_ne!(
                kind,
                Some(io::ErrorKind::WouldBlock),
                "upstream read timed out"
            );
        }
        other => panic!("upstream side still open {within:?} after the client reset: {other:?}"),
    }
}

// ---------------------------------------------------------------------------------------------
// Resources
// ---------------------------------------------------------------------------------------------

#[test]
fn slow_reader_bounded_memory() {
    let _g = heavy_lock();
    const LEN: u64 = 256 * MIB;
    const LIMIT_KIB: u64 = 16 * 1024;
    let (src, progress) = source_server(LEN, 0x51);
    let proxy = spawn_proxy_to(src.addr(), &[]);
    let base = proxy.rss_kib();
    let mut c = connect(proxy.addr());
    // Read nothing while the upstream offers 256 MiB: at least 3 s, and until the upstream
    // has been stuck for 500 ms (every buffer on the way is full; under load that takes
    // longer), sampling the proxy's RSS. The sleep only paces the sampling.
    let t0 = Instant::now();
    let give_up = t0 + scaled_secs(30);
    let mut peak = base;
    let mut last = (progress.load(Ordering::SeqCst), Instant::now());
    loop {
        peak = peak.max(proxy.rss_kib());
        let now = progress.load(Ordering::SeqCst);
        if now != last.0 {
            last = (now, Instant::now());
        }
        let stuck = now > 0 && last.1.elapsed() >= Duration::from_millis(500);
        if (stuck && t0.elapsed() >= Duration::from_secs(3)) || Instant::now() >= give_up {
            break;
        }
        thread::sleep(Duration::from_millis(50));
    }
    let written = progress.load(Ordering::SeqCst);
    assert!(
        written < LEN,
        "the upstream wrote all {LEN} bytes to a client that read nothing"
    );
    eprintln!(
        "slow reader: base {base} KiB, peak {peak} KiB, upstream wrote {} MiB while we stalled",
        written / MIB
    );
    assert!(
        peak - base < LIMIT_KIB,
        "proxy RSS grew by {} KiB while the client did not read",
        peak - base
    );
    // Now read everything and check it.
    let (len, h) = read_to_eof_hash(&mut c, Instant::now() + scaled_secs(180)).expect("read all");
    assert_eq!(len, LEN, "client got {len} of {LEN} bytes");
    assert!(h == pattern_hash(0x51, LEN), "bytes differ");
}

#[test]
fn sequential_5000_connections_no_fd_leak() {
    let _g = heavy_lock();
    let echo = echo_server();
    let proxy = spawn_proxy_to(echo.addr(), &[]);
    let addr = proxy.addr();
    let start_fds = proxy.fd_count();
    {
        let mut c = connect(addr);
        assert_echo(&mut c, b"warm-up");
    }
    let baseline = if wait_until(scaled_secs(10), || proxy.fd_count() <= start_fds) {
        start_fds
    } else {
        let now = proxy.fd_count();
        eprintln!("note: fd count after warm-up settled at {now}, not {start_fds}; using it");
        now
    };
    let msg = *b"0123456789abcdef";
    let mut back = [0u8; 16];
    for i in 0..5000 {
        let mut c =
            try_connect(addr, scaled_secs(10)).unwrap_or_else(|e| panic!("connect #{i}: {e}"));
        c.write_all(&msg)
            .unwrap_or_else(|e| panic!("write #{i}: {e}"));
        read_exact_deadline(&mut c, &mut back, Instant::now() + scaled_secs(10))
            .unwrap_or_else(|e| panic!("read #{i}: {e}"));
        assert_eq!(back, msg, "connection #{i} echoed different bytes");
    }
    let within = scaled_secs(10);
    let ok = wait_until(within, || proxy.fd_count() <= baseline);
    assert!(
        ok,
        "proxy fd count {} did not return to baseline {baseline} within {within:?}",
        proxy.fd_count()
    );
}

#[test]
fn ipv6_loopback() {
    if !ipv6_available() {
        eprintln!("note: [::1] cannot be bound on this machine; skipping ipv6_loopback");
        return;
    }
    let echo = echo_server_on("[::1]:0".parse().unwrap()).expect("echo on [::1]");
    let port = echo.addr().port().to_string();
    let proxy = spawn_proxy(&["-l", "::1", "-p", "0", "-b", "::1", "-P", &port]);
    let addr = proxy.addr();
    assert!(
        addr.is_ipv6() && addr.ip().is_loopback(),
        "listening on {addr}"
    );
    let mut c = connect(addr);
    assert_echo(&mut c, b"over ipv6");
    let big = Pattern::bytes(6, 64 * 1024);
    assert_echo(&mut c, &big);
    assert_eq!(echo.accepted(), 1);
}

/// Soft/hard open-files limit of `pid` as /proc/PID/limits shows it.
fn nofile_line(pid: u32) -> String {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap_or_default();
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap_or("")
        .to_string()
}

/// The part of the fd-exhaustion tests after the proxy runs with 64 fds: 200 clients, the
/// proxy must not spin (CPU < 20% of a core over a 2 s window), then serve normally once
/// they leave, and its summary must show a pause. Returns the summary's (limit, emfile)
/// pause counts.
fn exhaust_fds_then_recover(proxy: &mut ProxyHandle) -> (Option<u64>, Option<u64>) {
    let addr = proxy.addr();
    let mut clients = Vec::new();
    for i in 0..200 {
        clients.push(
            try_connect(addr, scaled_secs(10)).unwrap_or_else(|e| panic!("connect #{i}: {e}")),
        );
    }
    // Let the proxy take what it can and settle (fd count stable for 500 ms, at most a
    // scaled 10 s); the sleep paces the polling.
    let mut last = proxy.fd_count();
    let mut stable_since = Instant::now();
    let settle_deadline = Instant::now() + scaled_secs(10);
    while Instant::now() < settle_deadline && stable_since.elapsed() < Duration::from_millis(500) {
        thread::sleep(Duration::from_millis(20));
        let now = proxy.fd_count();
        if now != last {
            last = now;
            stable_since = Instant::now();
        }
    }
    let fds = proxy.fd_count();
    let tck = clk_tck();
    let t0 = proxy.cpu_ticks();
    let w0 = Instant::now();
    // Measurement window: 2 s with 200 clients pending, no traffic. (Not a wait for a
    // condition: CPU per wall second is measured over a window; its length does not decide
    // the outcome, a spinning proxy uses most of a core over any window.)
    thread::sleep(Duration::from_secs(2));
    let used = proxy.cpu_ticks() - t0;
    let wall = w0.elapsed().as_secs_f64();
    let cpu = used as f64 / tck as f64 / wall;
    eprintln!(
        "fd exhaustion: proxy holds {fds} fds, cpu {:.1}% of one core",
        cpu * 100.0
    );
    assert!(
        cpu < 0.20,
        "proxy used {:.1}% of a core while paused (busy loop?)",
        cpu * 100.0
    );

    drop(clients);
    // After the clients are gone the proxy serves normally again.
    let mut c = try_connect(addr, scaled_secs(10)).expect("connect after clients left");
    c.write_all(b"after the storm").expect("write");
    let mut back = [0u8; 15];
    if let Err(e) = read_exact_deadline(&mut c, &mut back, Instant::now() + scaled_secs(20)) {
        panic!(
            "no echo after fd exhaustion: {e}; proxy stderr:\n{}",
            proxy.stderr_text()
        );
    }
    assert_eq!(&back, b"after the storm");
    drop(c);

    proxy.sigterm();
    let st = proxy.wait_exit(scaled_secs(20));
    let err = proxy.stderr_text();
    assert_no_panic(&err);
    assert_eq!(exit_code(st), Some(0), "stderr:\n{err}");
    let pauses = proxy.summary_value("accept_pauses");
    let limit = proxy.summary_sub("accept_pauses", "limit");
    let emfile = proxy.summary_sub("accept_pauses", "emfile");
    eprintln!("accept_pauses: {pauses:?} (limit={limit:?} emfile={emfile:?})");
    assert!(
        pauses.is_some_and(|p| p >= 1),
        "summary shows no accept pause; stderr:\n{err}"
    );
    // Regression: with the last descriptor spent on accept(), the upstream socket() failed
    // and the accepted client was dropped as `no_backend`. Accepted clients must wait instead.
    for reason in ["no_backend", "internal"] {
        assert_eq!(
            proxy.summary_sub("closed", reason),
            Some(0),
            "accepted clients were dropped ({reason}) under fd exhaustion; stderr:\n{err}"
        );
    }
    (limit, emfile)
}

#[test]
fn fd_exhaustion_pauses_without_spinning() {
    let _g = heavy_lock();
    let echo = echo_server();
    let script = r#"ulimit -Sn 64 -Hn 64 2>/dev/null || ulimit -n 64; exec "$0" "$@""#;
    let mut cmd = Command::new("sh");
    cmd.arg("-c")
        .arg(script)
        .arg(PROXY_BIN)
        .args(proxy_args(echo.addr(), &["--max-conns", "10000"]));
    let mut proxy = spawn_proxy_cmd(cmd);
    let nofile = nofile_line(proxy.pid());
    assert!(nofile.contains(" 64 "), "fd limit not applied: {nofile}");
    exhaust_fds_then_recover(&mut proxy);
}

/// The proxy sized itself for a large fd limit, then the limit drops under it (prlimit), so
/// accept really fails with EMFILE: it must pause and retry on a timer, not spin.
#[test]
fn emfile_after_start_pauses_without_spinning() {
    let _g = heavy_lock();
    let echo = echo_server();
    let mut proxy = spawn_proxy_to(echo.addr(), &["--max-conns", "1000"]);
    set_nofile_limit_of(proxy.pid(), 64, 64).expect("prlimit on the proxy");
    let nofile = nofile_line(proxy.pid());
    assert!(nofile.contains(" 64 "), "fd limit not applied: {nofile}");
    let (_, emfile) = exhaust_fds_then_recover(&mut proxy);
    assert!(
        emfile.is_some_and(|e| e >= 1),
        "summary shows no EMFILE pause; stderr:\n{}",
        proxy.stderr_text()
    );
}

// ---------------------------------------------------------------------------------------------
// Admission and timeouts
// ---------------------------------------------------------------------------------------------

#[test]
fn idle_timeout_closes_idle_only() {
    // A 3 s idle timeout against an active client that talks every 50 ms: 60 times the
    // pacing, so a loaded machine cannot starve the active client into looking idle. The
    // idle client must be closed no sooner than the timeout (a lower bound, never scaled)
    // and in time; the active one must stay open and echo for the whole run.
    const IDLE: Duration = Duration::from_secs(3);
    let echo = echo_server();
    let proxy = spawn_proxy_to(echo.addr(), &["--idle-timeout", "3s"]);
    let addr = proxy.addr();
    let idle_done = Arc::new(AtomicBool::new(false));
    let done2 = Arc::clone(&idle_done);
    let active = thread::spawn(move || -> Result<u32, String> {
        let mut c = try_connect(addr, scaled_secs(10)).map_err(|e| e.to_string())?;
        let t0 = Instant::now();
        let mut i = 0u32;
        // Until the idle client is closed, and at least two idle timeouts long.
        while !done2.load(Ordering::SeqCst) || t0.elapsed() < 2 * IDLE {
            let msg = i.to_le_bytes();
            let back = roundtrip(&mut c, &msg, scaled_secs(10))
                .map_err(|e| format!("active connection failed at round {i}: {e}"))?;
            if back != msg {
                return Err("active connection echoed different bytes".into());
            }
            i += 1;
            // Paces the client; nothing is decided by how long it sleeps.
            thread::sleep(Duration::from_millis(50));
            if t0.elapsed() > scaled_secs(60) {
                return Err("the idle connection was never closed".into());
            }
        }
        Ok(i)
    });
    let mut idle = connect(addr);
    // The pair's last activity is after `t0`, so it may not close before `t0 + IDLE`.
    let t0 = Instant::now();
    assert_echo(&mut idle, b"then silence");
    let within = IDLE + scaled_secs(10);
    let res = wait_closed(&mut idle, within);
    let dt = t0.elapsed();
    idle_done.store(true, Ordering::SeqCst);
    match res {
        Ok((_, 0)) => {}
        Ok((_, n)) => panic!("idle connection got {n} unexpected bytes"),
        Err(_) => panic!("idle connection still open {within:?} after its last byte"),
    }
    // A little slack below the timeout for a coarse idle timer.
    assert!(
        dt >= IDLE - Duration::from_millis(250),
        "idle connection closed too early ({dt:?}, idle timeout {IDLE:?})"
    );
    let rounds = active
        .join()
        .expect("active thread")
        .expect("active connection");
    eprintln!("idle timeout: idle pair closed after {dt:?}; active pair made {rounds} round trips");
}

#[test]
fn max_conns_admission() {
    let echo = echo_server();
    let proxy = spawn_proxy_to(echo.addr(), &["--max-conns", "10"]);
    let addr = proxy.addr();
    let mut conns: Vec<TcpStream> = Vec::new();
    for i in 0..10u8 {
        let mut c = connect(addr);
        assert_echo(&mut c, &[b'a' + i; 10]);
        conns.push(c);
    }
    // The 11th waits in the kernel backlog: connected, but not served.
    let mut c11 = connect(addr);
    c11.write_all(b"eleven").expect("write 11th");
    let mut buf = [0u8; 6];
    match read_exact_deadline(&mut c11, &mut buf, Instant::now() + Duration::from_secs(1)) {
        Ok(()) => panic!("11th connection served while 10 were active"),
        Err(e) => assert_eq!(
            e.kind(),
            io::ErrorKind::TimedOut,
            "11th connection must wait, not be dropped: {e}"
        ),
    }
    assert_eq!(
        echo.accepted(),
        10,
        "upstream saw a connection for the 11th client"
    );
    // Two leave: the 11th is served.
    conns.truncate(8);
    if let Err(e) = read_exact_deadline(&mut c11, &mut buf, Instant::now() + scaled_secs(10)) {
        panic!(
            "11th connection not served after two closed: {e}; proxy stderr:\n{}",
            proxy.stderr_text()
        );
    }
    assert_eq!(&buf, b"eleven");
    for (i, c) in conns.iter_mut().enumerate() {
        assert_echo(c, &[b'A' + i as u8; 3]);
    }
}

// ---------------------------------------------------------------------------------------------
// Signals and the summary
// ---------------------------------------------------------------------------------------------

#[test]
fn sigterm_drains_inflight_transfer() {
    let _g = heavy_lock();
    const LEN: u64 = 64 * MIB;
    const BEFORE: u64 = 16 * MIB;
    let echo = echo_server();
    let mut proxy = spawn_proxy_to(echo.addr(), &["--grace", "20s"]);
    let c = connect(proxy.addr());
    let mut w = c.try_clone().expect("clone");
    let (go_tx, go_rx) = mpsc::channel::<()>();
    let writer = thread::spawn(move || -> io::Result<Hash> {
        let mut p = Pattern::new(0x5167);
        let mut buf = vec![0u8; CHUNK];
        let mut h = Sha256::new();
        let mut sent = 0u64;
        while sent < LEN {
            if sent == BEFORE {
                // Hold the rest until the proxy has been told to stop.
                go_rx
                    .recv_timeout(scaled_secs(60))
                    .map_err(|_| io::Error::other("no go signal"))?;
            }
            p.fill(&mut buf);
            w.write_all(&buf)?;
            h.update(&buf);
            sent += CHUNK as u64;
        }
        w.shutdown(Shutdown::Write)?;
        Ok(finish(h))
    });
    let received = Arc::new(AtomicU64::new(0));
    let rcv = Arc::clone(&received);
    let mut r = c;
    let reader = thread::spawn(move || -> io::Result<(u64, Hash)> {
        let deadline = Instant::now() + scaled_secs(120);
        let mut buf = vec![0u8; CHUNK];
        let mut h = Sha256::new();
        let mut total = 0u64;
        loop {
            let left = deadline
                .checked_duration_since(Instant::now())
                .ok_or_else(|| io::Error::new(io::ErrorKind::TimedOut, "deadline"))?;
            r.set_read_timeout(Some(left))?;
            let n = r.read(&mut buf)?;
            if n == 0 {
                return Ok((total, finish(h)));
            }
            h.update(&buf[..n]);
            total += n as u64;
            rcv.store(total, Ordering::SeqCst);
        }
    });
    assert!(
        wait_until(scaled_secs(30), || received.load(Ordering::SeqCst)
            >= BEFORE / 2),
        "transfer did not start"
    );
    let lines = proxy.stderr_line_count();
    proxy.sigterm();
    // The proxy acts on the signal: it logs that its listeners are closed...
    assert!(
        proxy
            .wait_stderr_lines_matching(lines, scaled_secs(10), |l| l.contains("listeners closed")),
        "no `listeners closed` line after SIGTERM; stderr:\n{}",
        proxy.stderr_text()
    );
    // ...and its listening socket is really gone (checked in /proc: once released, the
    // port may be anyone's, so a connect to it proves nothing about the proxy).
    let addr = proxy.addr();
    assert!(
        wait_until(scaled_secs(10), || !proxy.listens_on(addr)),
        "the proxy still listens on {addr} after SIGTERM"
    );
    let _ = go_tx.send(());
    let sent = writer.join().expect("writer thread").expect("client write");
    let (len, h) = reader.join().expect("reader thread").expect("client read");
    assert_eq!(len, LEN, "client got {len} of {LEN} bytes back");
    assert!(h == sent, "bytes differ after SIGTERM");
    let st = proxy.wait_exit(scaled_secs(15));
    let err = proxy.stderr_text();
    assert_no_panic(&err);
    assert_eq!(exit_code(st), Some(0), "stderr:\n{err}");
    assert!(err.contains("epoxy summary:"), "no summary; stderr:\n{err}");
    assert!(
        proxy.summary_value("accepted").is_some_and(|a| a >= 1),
        "stderr:\n{err}"
    );
    assert_eq!(proxy.summary_value("active"), Some(0), "stderr:\n{err}");
}

#[test]
fn second_sigint_exits_promptly() {
    let echo = echo_server();
    let mut proxy = spawn_proxy_to(echo.addr(), &["--grace", "30s"]);
    let mut c = connect(proxy.addr());
    assert_echo(&mut c, b"stay with me");
    proxy.sigint();
    // A live pair keeps the proxy in its 30 s grace period (a "no sooner" check: not
    // scaled).
    assert!(
        proxy.wait_exit(Duration::from_millis(500)).is_none(),
        "proxy exited on the first SIGINT with a live pair; stderr:\n{}",
        proxy.stderr_text()
    );
    let t0 = Instant::now();
    proxy.sigint();
    // Promptly = far inside the 30 s grace period.
    let within = scaled_secs(10);
    let st = proxy.wait_exit(within);
    let err = proxy.stderr_text();
    assert!(
        st.is_some(),
        "still running {within:?} after the second SIGINT; stderr:\n{err}"
    );
    eprintln!("second SIGINT: exit {:?} after {:?}", st, t0.elapsed());
    assert_no_panic(&err);
    assert!(err.contains("epoxy summary:"), "no summary; stderr:\n{err}");
}

#[test]
fn bad_cli_exits_2() {
    let cases: [&[&str]; 4] = [
        &["-l", "127.0.0.1", "-p", "0", "--no-such-flag"],
        &["-l", "127.0.0.1", "-p", "70000"],
        &["-l", "127.0.0.1", "-p", "0", "--idle-timeout", "5parsecs"],
        &["-l", "127.0.0.1", "-p", "0", "--connect-timeout", "soon"],
    ];
    for args in cases {
        let (st, err) = run_proxy_to_exit(args, scaled_secs(10));
        assert!(st.is_some(), "proxy {args:?} did not exit; stderr:\n{err}");
        assert_eq!(exit_code(st), Some(2), "proxy {args:?}; stderr:\n{err}");
        assert!(!err.trim().is_empty(), "proxy {args:?} printed no error");
        assert_no_panic(&err);
    }
}

#[test]
fn port_in_use_exits_1() {
    let holder = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).expect("bind");
    let addr = holder.local_addr().unwrap();
    let port = addr.port().to_string();
    let backend = dead_port();
    let backend_port = backend.addr().port().to_string();
    let (st, err) = run_proxy_to_exit(
        &[
            "-l",
            "127.0.0.1",
            "-p",
            &port,
            "-b",
            "127.0.0.1",
            "-P",
            &backend_port,
        ],
        scaled_secs(10),
    );
    assert_eq!(exit_code(st), Some(1), "stderr:\n{err}");
    assert!(
        err.contains(&addr.to_string()),
        "error does not name {addr}; stderr:\n{err}"
    );
    assert_no_panic(&err);
    drop(holder);
}

#[test]
fn summary_byte_counters_exact() {
    // Upstream: read the request to EOF, answer 3 * len + 11 bytes, close.
    let (srv, _events) = scripted_server(|mut s, _report| {
        let mut buf = vec![0u8; CHUNK];
        let mut len = 0u64;
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => len += n as u64,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
        let _ = write_pattern(&mut s, len, 3 * len + 11);
        let _ = s.shutdown(Shutdown::Write);
    });
    let mut proxy = spawn_proxy_to(srv.addr(), &[]);
    let addr = proxy.addr();
    let sizes = [1u64, 100_000, 1_234_567];
    let (mut sent, mut received) = (0u64, 0u64);
    for &n in &sizes {
        let mut c = connect(addr);
        write_pattern(&mut c, n, n).expect("write request");
        c.shutdown(Shutdown::Write).expect("shutdown");
        let (len, h) =
            read_to_eof_hash(&mut c, Instant::now() + scaled_secs(30)).expect("read reply");
        assert_eq!(len, 3 * n + 11);
        assert!(h == pattern_hash(n, 3 * n + 11), "reply bytes differ");
        sent += n;
        received += len;
    }
    proxy.sigterm();
    let st = proxy.wait_exit(scaled_secs(15));
    let err = proxy.stderr_text();
    assert_eq!(exit_code(st), Some(0), "stderr:\n{err}");
    assert_no_panic(&err);
    assert_eq!(
        proxy.summary_value("bytes_client_to_upstream"),
        Some(sent),
        "stderr:\n{err}"
    );
    assert_eq!(
        proxy.summary_value("bytes_upstream_to_client"),
        Some(received),
        "stderr:\n{err}"
    );
    assert_eq!(
        proxy.summary_value("accepted"),
        Some(sizes.len() as u64),
        "stderr:\n{err}"
    );
    assert_eq!(
        proxy.summary_value("closed"),
        Some(sizes.len() as u64),
        "stderr:\n{err}"
    );
    assert_eq!(proxy.summary_value("active"), Some(0), "stderr:\n{err}");
    assert_eq!(
        proxy.summary_value("connect_failures"),
        Some(0),
        "stderr:\n{err}"
    );
    assert!(proxy.summary_value("uptime").is_some(), "stderr:\n{err}");
}
