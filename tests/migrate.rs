//! Moving live pairs to the new process on SIGUSR2 (`upgrade_migrate`, the default): long
//! echo streams keep flowing through the new process while the old one exits within seconds
//! despite a 60 s grace period; the edge cases (half-closed, full buffers both ways, a pair
//! still connecting, a running idle timeout, a PROXY header already sent) each arrive intact;
//! a new process killed in the middle of a hand-over leaves every pair with the old one.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use crate::upgrade::{
    Churn, Generations, become_subreaper, children_of, config_with, reap, stream, upgrade,
    wait_active,
};
use crate::util::*;

/// The live pairs the admin endpoint lists.
fn connections(admin: SocketAddr) -> Vec<serde_json::Value> {
    let (code, body) = http_get(admin, "/connections").expect("GET /connections");
    assert_eq!(code, 200);
    serde_json::from_str::<serde_json::Value>(&body)
        .expect("json")
        .as_array()
        .cloned()
        .unwrap_or_default()
}

fn num(v: &serde_json::Value, key: &str) -> f64 {
    v.get(key).and_then(|x| x.as_f64()).unwrap_or(-1.0)
}

/// Wait until the first process (our child) has exited; assert it exited 0 within `within`.
fn first_exits(p: &mut ProxyHandle, within: Duration) {
    assert!(
        wait_until(within, || p.has_exited()),
        "the old process is still running {within:?} after the hand-over; stderr:\n{}",
        p.stderr_text()
    );
    let st = p.status().expect("status");
    assert!(st.success(), "old process: {st:?}");
}

/// 40 long streams and a connect loop across SIGUSR2 with `grace_period = 60s`: the old
/// process exits within 5 s, the new one lists all 40 with their history, every stream ends
/// intact, no connection fails.
fn forty_streams_move(extra: &[&str]) {
    let _heavy = heavy_lock();
    become_subreaper();
    let echo = echo_server();
    let st = start_cfg("toml", 1, extra, true, &config_with(echo.addr(), true, ""));
    let addr = st.addr(0);
    let admin = st.admin.expect("admin");
    let mut first = st.proxy;
    let mut gens = Generations::default();
    let churn = Churn::start(addr);
    let began = Instant::now();
    let streams: Vec<_> = (0..40)
        .map(|i| stream(addr, 5000 + i, 120, Duration::from_millis(25)))
        .collect();
    wait_active(admin, 40);
    // Some history before the move.
    assert!(wait_until(scaled_secs(20), || {
        connections(admin)
            .iter()
            .filter(|c| num(c, "bytes_upstream") >= 4096.0 * 4.0)
            .count()
            >= 40
    }));
    let new = upgrade(first.pid(), admin, &first);
    gens.0.push(new);
    let signalled = Instant::now();
    first_exits(&mut first, scaled_secs(5));
    println!(
        "old process gone {:?} after the new one answered",
        signalled.elapsed()
    );
    let moved: Vec<_> = connections(admin)
        .into_iter()
        .filter(|c| num(c, "bytes_upstream") >= 4096.0 * 4.0)
        .collect();
    assert_eq!(moved.len(), 40, "the new process lists {moved:?}");
    let since = began.elapsed().as_secs_f64();
    for c in &moved {
        let age = num(c, "age_seconds");
        assert!(
            age > 0.05 && age <= since + 0.5,
            "age {age} (streams began {since:.3}s ago)"
        );
        assert!(num(c, "bytes_downstream") >= 4096.0 * 3.0, "{c}");
    }
    for (i, s) in streams.into_iter().enumerate() {
        s.join()
            .expect("stream thread")
            .unwrap_or_else(|e| panic!("stream {i}: {e}"));
    }
    churn.finish();
    let text = metrics_text(admin);
    let migrated = metric(&text, "epoxy_migrated_connections_total", &[]).unwrap_or(0.0);
    assert!(
        migrated >= 40.0,
        "epoxy_migrated_connections_total {migrated}"
    );
    gens.stop(new);
    let log = first.stderr_text();
    assert!(!log.contains("upgrade failed"), "{log}");
    assert_no_panic(&log);
}

#[test]
fn forty_streams_move_to_the_new_process() {
    forty_streams_move(&[]);
}

#[test]
fn forty_streams_move_with_two_workers() {
    forty_streams_move(&["--workers", "2"]);
}

#[test]
fn forty_streams_move_with_splice() {
    forty_streams_move(&["--splice"]);
}

/// One moved pair, checked by a custom backend: start the proxy, run `setup` (which opens
/// the client side and returns once the pair is in the state under test), upgrade, then
/// `finish` (which checks the rest of the exchange). The pair must be listed by the new
/// process and counted as moved.
struct OnePair {
    first: ProxyHandle,
    admin: SocketAddr,
    addr: SocketAddr,
    gens: Generations,
    _file: TempFile,
}

impl OnePair {
    fn start(backend: SocketAddr, extra_app: &str) -> OnePair {
        become_subreaper();
        let st = start_cfg("toml", 1, &[], true, &config_with(backend, true, extra_app));
        OnePair {
            addr: st.addr(0),
            admin: st.admin.expect("admin"),
            first: st.proxy,
            gens: Generations::default(),
            _file: st.file,
        }
    }

    /// SIGUSR2; the old process must exit within 5 s having moved `n` pairs.
    fn upgrade_moving(&mut self, n: u64) -> u32 {
        let new = upgrade(self.first.pid(), self.admin, &self.first);
        self.gens.0.push(new);
        first_exits(&mut self.first, scaled_secs(5));
        let text = metrics_text(self.admin);
        assert_eq!(
            metric(&text, "epoxy_migrated_connections_total", &[]),
            Some(n as f64),
            "stderr:\n{}",
            self.first.stderr_text()
        );
        new
    }

    fn stop(mut self, new: u32) {
        self.gens.stop(new);
        assert_no_panic(&self.first.stderr_text());
    }
}

/// Half-closed: the client sent everything and shut down its side; the backend answers
/// slowly after the upgrade. The moved pair is listed as half-closed and the answer arrives
/// whole, then EOF.
#[test]
fn half_closed_pair_moves_intact() {
    let go = Arc::new(AtomicBool::new(false));
    let got = Arc::new(Mutex::new(Vec::new()));
    let (go2, got2) = (go.clone(), got.clone());
    let backend = Server::start("127.0.0.1:0".parse().expect("addr"), move |mut s, _| {
        let mut all = Vec::new();
        let _ = s.read_to_end(&mut all);
        *got2.lock().expect("lock") = all;
        while !go2.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(5));
        }
        for i in 0..20u64 {
            if s.write_all(&Pattern::bytes(700 + i, 1024)).is_err() {
                return;
            }
            thread::sleep(Duration::from_millis(10));
        }
    });
    let mut p = OnePair::start(backend.addr(), "");
    let mut c = connect(p.addr);
    let sent = Pattern::bytes(1, 10_000);
    c.write_all(&sent).expect("send");
    c.shutdown(Shutdown::Write).expect("shutdown");
    assert!(
        wait_until(scaled_secs(10), || got.lock().expect("lock").len()
            == sent.len()),
        "the backend did not get the request and EOF"
    );
    assert!(wait_until(scaled_secs(10), || connections(p.admin)
        .iter()
        .any(
            |x| x.get("state").and_then(|s| s.as_str()) == Some("half_closed")
        )));
    let new = p.upgrade_moving(1);
    let listed = connections(p.admin);
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(
        listed[0].get("state").and_then(|s| s.as_str()),
        Some("half_closed")
    );
    assert_eq!(num(&listed[0], "bytes_upstream"), 10_000.0);
    go.store(true, Ordering::SeqCst);
    c.set_read_timeout(Some(scaled_secs(20))).expect("timeout");
    let mut answer = Vec::new();
    c.read_to_end(&mut answer).expect("answer and EOF");
    let want: Vec<u8> = (0..20u64)
        .flat_map(|i| Pattern::bytes(700 + i, 1024))
        .collect();
    assert!(answer == want, "answer differs: {} bytes", answer.len());
    assert_eq!(*got.lock().expect("lock"), sent);
    p.stop(new);
}

/// A slow reader both ways: client and backend each write 64 MiB without reading, so the
/// pair's buffers and the kernel's are full in both directions when it moves; afterwards both
/// read everything, in order.
#[test]
fn pair_with_full_buffers_both_ways_moves_intact() {
    // splice = "auto": the held bytes sit in kernel pipes (copied out with tee, moved, and
    // written into pipes of the new process).
    full_buffers_both_ways("");
}

#[test]
fn pair_with_full_buffers_both_ways_moves_intact_without_splice() {
    full_buffers_both_ways("splice = false\n");
}

fn full_buffers_both_ways(app_extra: &str) {
    const N: u64 = 64 << 20;
    let go = Arc::new(AtomicBool::new(false));
    let backend_hash = Arc::new(Mutex::new(None));
    let (go2, bh2) = (go.clone(), backend_hash.clone());
    let backend = Server::start("127.0.0.1:0".parse().expect("addr"), move |s, _| {
        let mut w = s.try_clone().expect("clone");
        let writer = thread::spawn(move || write_pattern(&mut w, 20, N).map(|_| ()));
        while !go2.load(Ordering::SeqCst) {
            thread::sleep(Duration::from_millis(5));
        }
        let mut r = s;
        let h = read_len_hash(&mut r, N, Instant::now() + scaled_secs(60));
        *bh2.lock().expect("lock") = Some(h.map_err(|e| e.to_string()));
        let _ = writer.join();
    });
    let mut p = OnePair::start(backend.addr(), app_extra);
    let c = connect(p.addr);
    let mut cw = c.try_clone().expect("clone");
    let writer = thread::spawn(move || write_pattern(&mut cw, 10, N).map(|_| ()));
    // Wait for both directions to stall: the counts stop moving.
    let snapshot = |admin| {
        connections(admin).first().map(|x| {
            (
                num(x, "bytes_upstream") as u64,
                num(x, "bytes_downstream") as u64,
            )
        })
    };
    let mut last = None;
    assert!(
        wait_until(scaled_secs(20), || {
            thread::sleep(Duration::from_millis(150));
            let now = snapshot(p.admin);
            let stalled = now.is_some_and(|(u, d)| u > 0 && d > 0) && now == last;
            last = now;
            stalled
        }),
        "the pair never stalled: {last:?}"
    );
    let (up, down) = last.expect("counts");
    assert!(up < N && down < N, "nothing was held back: {up} {down}");
    let new = p.upgrade_moving(1);
    go.store(true, Ordering::SeqCst);
    let mut cr = c;
    let h =
        read_len_hash(&mut cr, N, Instant::now() + scaled_secs(60)).expect("client reads 64 MiB");
    assert_eq!(h, pattern_hash(20, N), "backend -> client bytes differ");
    writer.join().expect("writer").expect("client wrote 64 MiB");
    assert!(wait_until(scaled_secs(30), || backend_hash
        .lock()
        .expect("lock")
        .is_some()));
    let bh = backend_hash.lock().expect("lock").clone().expect("hash");
    assert_eq!(
        bh.expect("backend reads 64 MiB"),
        pattern_hash(10, N),
        "client -> backend bytes differ"
    );
    drop(cr);
    p.stop(new);
}

/// A pair still connecting (to a black-holed first target, then failing over) when the
/// upgrade starts is finished in the old process within the move's time budget, then moved.
#[test]
fn pair_still_connecting_is_finished_then_moved() {
    let bh = crate::routing::blackhole();
    let echo = echo_server();
    become_subreaper();
    let cfg = format!(
        "[defaults]\ngrace_period = \"60s\"\n\n[[app]]\nname = \"up\"\nlisten = [\"{}\"]\nconnect_timeout = \"300ms\"\ntargets = [{{ addr = \"{}\", weight = 100 }}, {{ addr = \"{}\", weight = 1 }}]\n",
        any_port(1),
        bh.addr,
        echo.addr()
    );
    let st = start_cfg("toml", 1, &[], true, &cfg);
    let admin = st.admin.expect("admin");
    let addr = st.addr(0);
    let mut first = st.proxy;
    let mut gens = Generations::default();
    let mut c = connect(addr);
    c.write_all(b"early bytes\n").expect("write");
    assert!(wait_until(scaled_secs(10), || connections(admin)
        .iter()
        .any(
            |x| x.get("state").and_then(|s| s.as_str()) == Some("connecting")
        )));
    let new = upgrade(first.pid(), admin, &first);
    gens.0.push(new);
    first_exits(&mut first, scaled_secs(5));
    let text = metrics_text(admin);
    assert_eq!(
        metric(&text, "epoxy_migrated_connections_total", &[]),
        Some(1.0)
    );
    let mut back = vec![0u8; 12];
    c.set_read_timeout(Some(scaled_secs(10))).expect("timeout");
    c.read_exact(&mut back).expect("echo of the early bytes");
    assert_eq!(&back, b"early bytes\n");
    assert_echo(&mut c, b"after the move");
    drop(c);
    gens.stop(new);
}

/// An idle pair keeps its idle clock: idle 2 s of a 3 s timeout before the move, it is
/// closed about 1 s after (not 3 s).
#[test]
fn idle_timeout_keeps_counting_after_the_move() {
    let echo = echo_server();
    let mut p = OnePair::start(echo.addr(), "idle_timeout = \"3s\"\n");
    let mut c = connect(p.addr);
    assert_echo(&mut c, b"last activity");
    let last = Instant::now();
    // Idle for 2 s of the 3 s before moving (a condition on the clock, not a guess).
    while last.elapsed() < Duration::from_secs(2) {
        thread::sleep(Duration::from_millis(20));
    }
    let new = p.upgrade_moving(1);
    match wait_closed(&mut c, scaled_secs(10)) {
        Ok(_) => {}
        Err(n) => panic!("not closed; {n} bytes"),
    }
    let idle = last.elapsed();
    assert!(
        idle >= Duration::from_millis(2900) && idle < Duration::from_millis(4500),
        "closed after {idle:?} idle (timeout 3 s, moved at 2 s)"
    );
    let text = metrics_text(p.admin);
    assert_eq!(
        metric(
            &text,
            "epoxy_closes_total",
            &[("app", "up"), ("reason", "idle_timeout")]
        ),
        Some(1.0)
    );
    p.stop(new);
}

/// `send_proxy`: the PROXY header went out before the move and is never sent again: the
/// backend sees one header, then exactly the client's bytes.
#[test]
fn proxy_header_is_not_sent_again_after_the_move() {
    let headers = Arc::new(AtomicU64::new(0));
    let h2 = headers.clone();
    let backend = Server::start("127.0.0.1:0".parse().expect("addr"), move |s, _| {
        let mut r = BufReader::new(s.try_clone().expect("clone"));
        let mut line = String::new();
        if r.read_line(&mut line).is_err() || !line.starts_with("PROXY TCP4 ") {
            return;
        }
        h2.fetch_add(1, Ordering::SeqCst);
        let mut w = s;
        let mut buf = [0u8; 4096];
        loop {
            match r.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    if w.write_all(&buf[..n]).is_err() {
                        return;
                    }
                }
            }
        }
    });
    let mut p = OnePair::start(backend.addr(), "send_proxy = \"v1\"\n");
    let mut c = connect(p.addr);
    assert_echo(&mut c, b"before the move");
    let new = p.upgrade_moving(1);
    assert_echo(&mut c, b"after the move");
    for i in 0..20 {
        assert_echo(&mut c, format!("line {i}").as_bytes());
    }
    assert_eq!(headers.load(Ordering::SeqCst), 1);
    assert_eq!(backend.accepted(), 1);
    drop(c);
    p.stop(new);
}

/// Ten echo streams (seeds from `seed`, `rounds` lines 20 ms apart) through a proxy with the
/// admin endpoint, started with the test hook `hook` set; returns once all ten are active.
struct TenStreams {
    first: ProxyHandle,
    admin: SocketAddr,
    streams: Vec<thread::JoinHandle<Result<(), String>>>,
    _echo: Server,
    _file: TempFile,
}

impl TenStreams {
    fn start(hook: (&str, &str), seed: u64, rounds: usize) -> TenStreams {
        become_subreaper();
        let echo = echo_server();
        let cfg = config_with(echo.addr(), true, "");
        let st = start_cfg_env("toml", 1, &[], true, &cfg, &[hook]);
        let addr = st.addr(0);
        let admin = st.admin.expect("admin");
        let streams: Vec<_> = (0..10)
            .map(|i| stream(addr, seed + i, rounds, Duration::from_millis(20)))
            .collect();
        wait_active(admin, 10);
        TenStreams {
            first: st.proxy,
            admin,
            streams,
            _echo: echo,
            _file: st.file,
        }
    }

    fn join_streams(&mut self) {
        for (i, s) in std::mem::take(&mut self.streams).into_iter().enumerate() {
            s.join()
                .expect("stream thread")
                .unwrap_or_else(|e| panic!("stream {i}: {e}"));
        }
    }
}

/// A new process slow to serve what it was given (it holds each commit 500 ms): the old one
/// waits at exit until the new one has read the whole channel, so once the old process is
/// gone the new one lists every moved pair and counts it, with no window in between.
#[test]
fn old_process_exits_only_once_the_new_one_serves_the_moved_pairs() {
    let mut t = TenStreams::start(("EPOXY_MIGRATE_TEST_COMMIT_HOLD_MS", "500"), 7100, 60);
    let mut gens = Generations::default();
    let new = upgrade(t.first.pid(), t.admin, &t.first);
    gens.0.push(new);
    first_exits(&mut t.first, scaled_secs(10));
    let listed = connections(t.admin);
    assert_eq!(
        listed.len(),
        10,
        "right after the old process exited: {listed:?}"
    );
    let text = metrics_text(t.admin);
    let migrated = metric(&text, "epoxy_migrated_connections_total", &[]).unwrap_or(0.0);
    assert_eq!(migrated, 10.0, "epoxy_migrated_connections_total");
    t.join_streams();
    gens.stop(new);
    let log = t.first.stderr_text();
    assert!(!log.contains("did not close the channel"), "{log}");
    assert_no_panic(&log);
}

/// `kill -9` of the new process while it holds a batch of moved pairs (before it answers):
/// the old process keeps every pair, and each stream ends intact through it.
#[test]
fn new_process_killed_mid_hand_over_loses_nothing() {
    let mut t = TenStreams::start(("EPOXY_MIGRATE_TEST_HOLD_MS", "60000"), 7000, 80);
    let old = t.first.pid();
    let from = t.first.stderr_line_count();
    send_signal(old, libc::SIGUSR2).expect("SIGUSR2");
    assert!(
        t.first
            .wait_stderr_lines_matching(from, scaled_secs(30), |l| l.contains("test hold")),
        "the new process never held a batch; stderr:\n{}",
        t.first.stderr_text()
    );
    let kids = children_of(old);
    assert_eq!(kids.len(), 1, "{kids:?}");
    send_signal(kids[0], libc::SIGKILL).expect("SIGKILL");
    t.join_streams();
    // The old process served them to the end and then exits (its listeners went with the
    // hand-over).
    first_exits(&mut t.first, scaled_secs(30));
    let log = t.first.stderr_text();
    assert!(
        log.contains("moving connections stopped") && log.contains("0 live connection(s) to PID"),
        "{log}"
    );
    assert!(reap(kids[0], scaled_secs(5)).is_some());
    assert_no_panic(&log);
}
