//! Routing through config files (issue 3): several apps and ports, balancing policies
//! (round-robin, weights, least-conn, source-hash), failover, passive and active health,
//! per-app limits, and the seed-shaped JSON and pipe formats.
//!
//! Targets are "id servers": on accept they write one identifying byte, then echo. Config files
//! listen on port 0 (`any_port`) and the tests read the bound ports from the proxy's log; dead
//! targets, and targets that die and come back, are ports the test holds (`HeldPort`). Every
//! wait has a (scaled) deadline.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream};
use std::thread;
use std::time::{Duration, Instant};

use crate::util::*;

// ---------------------------------------------------------------------------------------------
// Helpers local to this file
// ---------------------------------------------------------------------------------------------

/// A target that writes `id` on accept, then echoes.
fn id_server(id: u8) -> Server {
    Server::start(SocketAddr::from((Ipv4Addr::LOCALHOST, 0)), move |s, _| {
        id_handler(s, id)
    })
}

fn id_handler(mut s: TcpStream, id: u8) {
    if s.write_all(&[id]).is_err() {
        return;
    }
    echo_handler(s);
}

/// The same on a held port (a target that can stop and come back on its port).
fn id_server_held(held: &HeldPort, id: u8) -> Server {
    Server::start_held(held, move |s, _| id_handler(s, id))
}

/// Stops `srv` (on a held port, so nothing else can take it) and waits until its port
/// refuses connections.
fn kill_server(srv: Server) {
    let addr = srv.addr();
    drop(srv);
    let gone = wait_until(scaled_secs(10), || is_refused(addr));
    assert!(gone, "server {addr} still accepts after being stopped");
}

/// Reads the target's id byte (within a scaled 10 s).
fn read_id(s: &mut TcpStream) -> io::Result<u8> {
    let mut b = [0u8; 1];
    read_exact_deadline(s, &mut b, Instant::now() + scaled_secs(10))?;
    Ok(b[0])
}

/// Connects to `addr`, reads the id, checks an echo; returns the stream and the id.
fn connect_id(addr: SocketAddr) -> (TcpStream, u8) {
    let mut c = connect(addr);
    let id = read_id(&mut c).unwrap_or_else(|e| panic!("read id via {addr}: {e}"));
    assert_echo(&mut c, b"ping");
    (c, id)
}

/// Connects from source address `src` (127.0.0.x) to `to`.
fn connect_from(src: Ipv4Addr, to: SocketAddr) -> io::Result<TcpStream> {
    use socket2::{Domain, Protocol, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP))?;
    s.bind(&SocketAddr::from((src, 0)).into())?;
    s.connect_timeout(&to.into(), scaled_secs(10))?;
    let t: TcpStream = s.into();
    t.set_nodelay(true)?;
    t.set_read_timeout(Some(io_timeout()))?;
    t.set_write_timeout(Some(io_timeout()))?;
    Ok(t)
}

fn quoted_targets(servers: &[&Server]) -> String {
    servers
        .iter()
        .map(|s| format!("\"{}\"", s.addr()))
        .collect::<Vec<_>>()
        .join(", ")
}

/// One app `name` with `balance = "POLICY"` over `targets` (see `start_one_app`).
fn start_balanced(name: &str, policy: &str, targets: &[Server], admin: bool) -> Started {
    let rest = format!(
        "balance = \"{policy}\"\ntargets = [{}]\n",
        quoted_targets(&targets.iter().collect::<Vec<_>>())
    );
    start_one_app(name, admin, &rest)
}

// ---------------------------------------------------------------------------------------------
// Apps and ports
// ---------------------------------------------------------------------------------------------

#[test]
fn two_apps_two_ports_route_to_their_own_targets() {
    let (a1, a2, b1, b2) = (
        id_server(b'a'),
        id_server(b'A'),
        id_server(b'b'),
        id_server(b'B'),
    );
    let st = start_cfg(
        "toml",
        4,
        &[],
        false,
        &format!(
            "[[app]]\nname = \"alpha\"\nlisten = [\"{}\", \"{}\"]\ntargets = [{}]\n\n\
             [[app]]\nname = \"beta\"\nlisten = [\"{}\", \"{}\"]\ntargets = [{}]\n",
            any_port(1),
            any_port(2),
            quoted_targets(&[&a1, &a2]),
            any_port(3),
            any_port(4),
            quoted_targets(&[&b1, &b2])
        ),
    );
    let (alpha, beta) = (st.app_addrs("alpha"), st.app_addrs("beta"));
    assert_eq!((alpha.len(), beta.len()), (2, 2), "{:?}", st.listeners);
    let mut seen_alpha = Vec::new();
    let mut seen_beta = Vec::new();
    for round in 0..4 {
        for &addr in &alpha {
            let (_c, id) = connect_id(addr);
            assert!(
                id == b'a' || id == b'A',
                "alpha listener {addr} (round {round}) reached target {:?}",
                id as char
            );
            seen_alpha.push(id);
        }
        for &addr in &beta {
            let (_c, id) = connect_id(addr);
            assert!(
                id == b'b' || id == b'B',
                "beta listener {addr} (round {round}) reached target {:?}",
                id as char
            );
            seen_beta.push(id);
        }
    }
    for id in [b'a', b'A'] {
        assert!(
            seen_alpha.contains(&id),
            "alpha never used target {}",
            id as char
        );
    }
    for id in [b'b', b'B'] {
        assert!(
            seen_beta.contains(&id),
            "beta never used target {}",
            id as char
        );
    }
    assert_eq!(a1.accepted() + a2.accepted(), 8);
    assert_eq!(b1.accepted() + b2.accepted(), 8);
    exit_cleanly(st.proxy);
}

// ---------------------------------------------------------------------------------------------
// Balancing
// ---------------------------------------------------------------------------------------------

#[test]
fn round_robin_is_exactly_even() {
    let t = [id_server(0), id_server(1), id_server(2)];
    let st = start_balanced("rr", "round-robin", &t, false);
    let mut counts = [0usize; 3];
    let mut order = Vec::new();
    for _ in 0..30 {
        let (_c, id) = connect_id(st.addr(0));
        counts[id as usize] += 1;
        order.push(id);
    }
    assert_eq!(counts, [10, 10, 10], "round-robin counts (order {order:?})");
    // Exact rotation: every window of 3 consecutive connections covers all three targets.
    for w in order.windows(3) {
        let mut s = w.to_vec();
        s.sort();
        assert_eq!(s, vec![0, 1, 2], "not a rotation: {order:?}");
    }
    exit_cleanly(st.proxy);
}

#[test]
fn weights_one_to_three_respected() {
    let (light, heavy) = (id_server(b'L'), id_server(b'H'));
    let st = start_one_app(
        "weighted",
        false,
        &format!(
            "targets = [\"{}\", {{ addr = \"{}\", weight = 3 }}]\n",
            light.addr(),
            heavy.addr()
        ),
    );
    const ROTATIONS: usize = 10;
    let mut l = 0usize;
    let mut order = String::new();
    for n in 1..=ROTATIONS * 4 {
        let (_c, id) = connect_id(st.addr(0));
        order.push(id as char);
        if id == b'L' {
            l += 1;
        }
        // After n connections the light target should have about n/4 of them: within 1.
        let ideal = n as f64 / 4.0;
        assert!(
            (l as f64 - ideal).abs() <= 1.0,
            "after {n} connections the weight-1 target had {l} (ideal {ideal}); order {order}"
        );
    }
    assert_eq!(l, ROTATIONS, "weight-1 target share; order {order}");
    assert_eq!(
        heavy.accepted(),
        3 * ROTATIONS,
        "weight-3 target share; order {order}"
    );
    exit_cleanly(st.proxy);
}

#[test]
fn least_conn_picks_target_with_fewest_live_pairs() {
    let t = [id_server(b'A'), id_server(b'B'), id_server(b'C')];
    let st = start_balanced("lc", "least-conn", &t, true);
    let admin = st.admin.expect("admin address");
    let addr = st.addr(0);
    let names: Vec<String> = t.iter().map(|s| s.addr().to_string()).collect();
    let active = |i: usize| {
        metric(
            &metrics_text(admin),
            "epoxy_target_connections_active",
            &[("app", "lc"), ("target", &names[i])],
        )
        .unwrap_or(-1.0)
    };
    // Six pairs: least-conn spreads them two per target.
    let mut held: Vec<(TcpStream, u8)> = (0..6).map(|_| connect_id(addr)).collect();
    let mut per = [0usize; 3];
    for (_, id) in &held {
        per[(id - b'A') as usize] += 1;
    }
    assert_eq!(per, [2, 2, 2], "least-conn did not spread 6 pairs evenly");
    // Keep 2 on A, 1 on B, 0 on C.
    let mut drop_b = 1;
    held.retain(|(_, id)| match id {
        b'C' => false,
        b'B' if drop_b > 0 => {
            drop_b -= 1;
            false
        }
        _ => true,
    });
    assert!(
        wait_until(scaled_secs(10), || active(0) == 2.0
            && active(1) == 1.0
            && active(2) == 0.0),
        "proxy never saw 2/1/0 live pairs on A/B/C: {} {} {}",
        active(0),
        active(1),
        active(2)
    );
    let (c1, id) = connect_id(addr);
    assert_eq!(
        id, b'C',
        "new pair went to {} instead of C (live A=2 B=1 C=0)",
        id as char
    );
    held.push((c1, id));
    // Now A=2, B=1, C=1: the next two go to B and C (tie), never to A.
    for _ in 0..2 {
        let (c, id) = connect_id(addr);
        assert_ne!(
            id, b'A',
            "new pair went to A, which had the most live pairs"
        );
        held.push((c, id));
    }
    drop(held);
    exit_cleanly(st.proxy);
}

#[test]
fn source_hash_stable_and_moves_only_removed_targets_clients() {
    let t = [id_server(0), id_server(1), id_server(2), id_server(3)];
    // The listener keeps its configured address (`127.0.0.1:0`) across the reload, so the
    // proxy keeps the bound socket and its port.
    let app = |targets: &[&Server]| {
        format!(
            "[[app]]\nname = \"sh\"\nlisten = [\"{}\"]\nbalance = \"source-hash\"\ntargets = [{}]\n",
            any_port(1),
            quoted_targets(targets)
        )
    };
    let st = start_cfg("toml", 1, &[], false, &app(&[&t[0], &t[1], &t[2], &t[3]]));
    let addr = st.addr(0);
    let clients: Vec<Ipv4Addr> = (2..=33).map(|i| Ipv4Addr::new(127, 0, 0, i)).collect();
    let pick = |src: Ipv4Addr| -> u8 {
        let mut c = connect_from(src, addr).unwrap_or_else(|e| panic!("connect from {src}: {e}"));
        read_id(&mut c).unwrap_or_else(|e| panic!("read id from {src}: {e}"))
    };
    let mut before = Vec::new();
    for &src in &clients {
        let first = pick(src);
        for _ in 0..2 {
            assert_eq!(
                pick(src),
                first,
                "client {src} changed target without a config change"
            );
        }
        before.push(first);
    }
    let mut per = [0usize; 4];
    for &id in &before {
        per[id as usize] += 1;
    }
    println!("source-hash: clients per target before removal {per:?}");
    assert!(
        per.iter().filter(|&&n| n > 0).count() >= 2,
        "32 client IPs all hashed to one target: {per:?}"
    );
    // Remove a target that has clients, preferring one in the middle of the list (a removal
    // that shifts the other targets' positions).
    let removed = [1usize, 2, 0, 3]
        .into_iter()
        .find(|&i| per[i] > 0)
        .expect("some target has clients");
    let remaining: Vec<&Server> = (0..4).filter(|&i| i != removed).map(|i| &t[i]).collect();
    for l in st.reload(&app(&remaining)) {
        assert_eq!(l, st.listeners[0], "the kept listener moved in the reload");
    }
    let mut moved_wrongly = Vec::new();
    for (k, &src) in clients.iter().enumerate() {
        let now = pick(src);
        assert_ne!(
            now, removed as u8,
            "client {src} still reaches the removed target"
        );
        if before[k] as usize != removed && now != before[k] {
            moved_wrongly.push(format!("{src}: {} -> {}", before[k], now));
        }
        assert_eq!(pick(src), now, "client {src} not stable after the reload");
    }
    assert!(
        moved_wrongly.is_empty(),
        "removing target {removed} moved clients of other targets: {moved_wrongly:?}"
    );
    exit_cleanly(st.proxy);
}

// ---------------------------------------------------------------------------------------------
// Failover
// ---------------------------------------------------------------------------------------------

#[test]
fn one_dead_target_of_three_all_300_succeed() {
    let (a, b) = (id_server(b'a'), id_server(b'b'));
    let dead = dead_port();
    let st = start_one_app(
        "fo",
        false,
        &format!(
            "targets = [\"{}\", \"{}\", \"{}\"]\n",
            a.addr(),
            dead.addr(),
            b.addr()
        ),
    );
    let addr = st.addr(0);
    let mut ok = 0;
    let mut failures = Vec::new();
    for i in 0..300 {
        let r = (|| -> io::Result<u8> {
            let mut c = try_connect(addr, scaled_secs(10))?;
            let id = read_id(&mut c)?;
            let back = roundtrip(&mut c, b"x", scaled_secs(10))?;
            if back != b"x" {
                return Err(io::Error::other("echo differs"));
            }
            Ok(id)
        })();
        match r {
            Ok(_) => ok += 1,
            Err(e) => failures.push(format!("#{i}: {e}")),
        }
    }
    assert_eq!(ok, 300, "failed connections: {failures:?}");
    assert_eq!(a.accepted() + b.accepted(), 300);
    let text = exit_cleanly(st.proxy);
    assert_eq!(
        summary_sub(&text, "closed", "no_backend"),
        Some(0),
        "no client should be counted as no_backend; stderr:\n{text}"
    );
}

#[test]
fn all_targets_refuse_client_closed_promptly() {
    let (d1, d2) = (dead_port(), dead_port());
    let st = start_one_app(
        "dead",
        false,
        &format!(
            "connect_timeout = \"2s\"\ntargets = [\"{}\", \"{}\"]\n",
            d1.addr(),
            d2.addr()
        ),
    );
    let addr = st.addr(0);
    // Refused connects fail at once; the bound only allows for a loaded machine.
    let within = scaled_secs(10);
    for i in 0..5 {
        let mut c = connect(addr);
        let t0 = Instant::now();
        match wait_closed(&mut c, within) {
            Ok((_, 0)) => {}
            Ok((how, n)) => panic!("client {i}: got {n} bytes before {how:?}"),
            Err(_) => panic!("client {i} still open {within:?} later"),
        }
        println!("all refused: client {i} closed after {:?}", t0.elapsed());
    }
    let text = exit_cleanly(st.proxy);
    assert_eq!(
        summary_sub(&text, "closed", "no_backend"),
        Some(5),
        "closes not counted as no_backend; stderr:\n{text}"
    );
}

/// A listener that completes no more handshakes: backlog 0, its queue filled by `fillers`.
pub(crate) struct Blackhole {
    _listener: socket2::Socket,
    _fillers: Vec<TcpStream>,
    pub(crate) addr: SocketAddr,
}

pub(crate) fn blackhole() -> Blackhole {
    use socket2::{Domain, Protocol, Socket, Type};
    let l = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).expect("socket");
    l.bind(&SocketAddr::from((Ipv4Addr::LOCALHOST, 0)).into())
        .expect("bind");
    l.listen(0).expect("listen");
    let addr = l
        .local_addr()
        .expect("local_addr")
        .as_socket()
        .expect("inet");
    let mut fillers = Vec::new();
    for i in 0..16 {
        // The first handshake always completes (it fills the queue); give it time under load.
        // The next one is expected to time out (its SYN is dropped).
        let t = if i == 0 {
            scaled_secs(10)
        } else {
            scaled(Duration::from_secs(1))
        };
        match TcpStream::connect_timeout(&addr, t) {
            Ok(s) => fillers.push(s),
            Err(_) => {
                return Blackhole {
                    _listener: l,
                    _fillers: fillers,
                    addr,
                };
            }
        }
    }
    panic!("could not fill the accept queue of a backlog-0 listener");
}

#[test]
fn all_targets_silent_closed_within_connect_timeout() {
    let bh = blackhole();
    let st = start_one_app(
        "silent",
        true,
        &format!("connect_timeout = \"300ms\"\ntargets = [\"{}\"]\n", bh.addr),
    );
    let addr = st.addr(0);
    let clients: Vec<TcpStream> = (0..3).map(|_| connect(addr)).collect();
    let t0 = Instant::now();
    // connect_timeout plus slack for a loaded machine: still far below the kernel's own SYN
    // timeout (over a minute), which is what a missing connect timeout would wait for.
    let within = Duration::from_millis(300) + scaled_secs(5);
    let handles: Vec<_> = clients
        .into_iter()
        .map(|mut c| thread::spawn(move || wait_closed(&mut c, within)))
        .collect();
    for (i, h) in handles.into_iter().enumerate() {
        match h.join().expect("waiter") {
            Ok((_, 0)) => {}
            Ok((how, n)) => panic!("client {i}: got {n} bytes before {how:?}"),
            Err(_) => {
                panic!("client {i} still open {within:?} after connecting (connect_timeout 300ms)")
            }
        }
    }
    println!("silent target: all clients closed after {:?}", t0.elapsed());
    let text = metrics_text(st.admin.expect("admin"));
    let timeouts = metric(
        &text,
        "epoxy_connect_errors_total",
        &[
            ("app", "silent"),
            ("target", &bh.addr.to_string()),
            ("reason", "timeout"),
        ],
    );
    assert!(
        timeouts.is_some_and(|v| v >= 1.0),
        "no connect timeout counted: {timeouts:?}"
    );
    // The close is counted right after the sockets are closed: allow a moment.
    let nb = || {
        metric(
            &metrics_text(st.admin.expect("admin")),
            "epoxy_closes_total",
            &[("app", "silent"), ("reason", "no_backend")],
        )
    };
    assert!(
        wait_until(scaled_secs(10), || nb() == Some(3.0)),
        "no_backend closes: {:?}, want 3",
        nb()
    );
    exit_cleanly(st.proxy);
}

// ---------------------------------------------------------------------------------------------
// Health
// ---------------------------------------------------------------------------------------------

/// Starts app `app` (one port, admin on) with id targets `a` and `b` and the `[app.health]`
/// settings `health`; checks that b starts up, then stops it. Returns the proxy, target a
/// (keep it alive) and b's port, held so that b can come back on it.
fn start_health_app_and_stop_b(app: &str, health: &str) -> (Started, Server, HeldPort) {
    let a = id_server(b'a');
    let b_port = HeldPort::new();
    let b = id_server_held(&b_port, b'b');
    let b_addr = b.addr();
    let st = start_one_app(
        app,
        true,
        &format!(
            "targets = [\"{}\", \"{b_addr}\"]\n[app.health]\n{health}",
            a.addr()
        ),
    );
    let admin = st.admin.expect("admin");
    assert_eq!(
        target_up(admin, app, &b_addr.to_string()),
        Some(1.0),
        "target b should start up"
    );
    kill_server(b);
    (st, a, b_port)
}

/// `epoxy_target_up` of `target` in `app`.
fn target_up(admin: SocketAddr, app: &str, target: &str) -> Option<f64> {
    metric(
        &metrics_text(admin),
        "epoxy_target_up",
        &[("app", app), ("target", target)],
    )
}

/// Fails unless the proxy logs a line containing `needle` within `timeout`.
fn expect_log(p: &ProxyHandle, needle: &str, timeout: Duration) {
    assert!(
        p.wait_stderr_contains(needle, timeout),
        "no `{needle}` log within {timeout:?}; stderr:\n{}",
        p.stderr_text()
    );
}

#[test]
fn passive_health_marks_down_after_fall_and_recovers() {
    // While down, b must read as down: give the test (scaled) 5 s for that before b is
    // retried on its own.
    let down_time = scaled_secs(5);
    let (st, _a, b_port) = start_health_app_and_stop_b(
        "pas",
        &format!("fall = 3\ndown_time = \"{}ms\"\n", down_time.as_millis()),
    );
    let b_addr = b_port.addr();
    let admin = st.admin.expect("admin");
    let addr = st.addr(0);
    let b_name = b_addr.to_string();
    let up = || target_up(admin, "pas", &b_name);
    // Every client still succeeds (failover to a) while b's failures add up.
    for i in 0..8 {
        let (_c, id) = connect_id(addr);
        assert_eq!(id, b'a', "connection {i} reached {:?}", id as char);
    }
    expect_log(
        &st.proxy,
        &format!("target {b_name} is DOWN"),
        scaled_secs(10),
    );
    assert_eq!(up(), Some(0.0), "epoxy_target_up of b while down");
    let refused = metric(
        &metrics_text(admin),
        "epoxy_connect_errors_total",
        &[("app", "pas"), ("target", &b_name), ("reason", "refused")],
    );
    assert!(
        refused.is_some_and(|v| v >= 3.0),
        "refused connects of b: {refused:?}"
    );
    // b comes back on its port; after down_time it is tried again and serves.
    let b2 = id_server_held(&b_port, b'b');
    let within = down_time + scaled_secs(10);
    assert!(
        wait_until(within, || up() == Some(1.0)),
        "b not up again {within:?} after its return (down_time {down_time:?})"
    );
    let reached_b = wait_until(scaled_secs(10), || connect_id(addr).1 == b'b');
    assert!(reached_b, "no connection reached b after it came back");
    assert!(b2.accepted() >= 1);
    exit_cleanly(st.proxy);
}

#[test]
fn active_health_down_and_up_by_probes() {
    // A refused probe fails at once whatever the timeout; a generous probe timeout keeps a
    // loaded machine from failing probes of the live target (two in a row would mark it
    // DOWN a second time).
    let (st, _a, b_port) = start_health_app_and_stop_b(
        "act",
        &format!(
            "interval = \"200ms\"\ntimeout = \"{}ms\"\nrise = 2\nfall = 2\n",
            scaled_secs(2).as_millis()
        ),
    );
    let b_addr = b_port.addr();
    let t0 = Instant::now();
    let admin = st.admin.expect("admin");
    let addr = st.addr(0);
    let b_name = b_addr.to_string();
    let up = || target_up(admin, "act", &b_name);
    // No client traffic: only the probes can notice.
    let down_line = format!("target {b_name} is DOWN");
    expect_log(&st.proxy, &down_line, scaled_secs(10));
    println!("active health: DOWN after {:?}", t0.elapsed());
    assert_eq!(up(), Some(0.0), "epoxy_target_up of b while down");
    for i in 0..6 {
        let (_c, id) = connect_id(addr);
        assert_eq!(id, b'a', "connection {i} went to the down target");
    }
    let b2 = id_server_held(&b_port, b'b');
    let t1 = Instant::now();
    expect_log(
        &st.proxy,
        &format!("target {b_name} is UP"),
        scaled_secs(10),
    );
    println!("active health: UP after {:?}", t1.elapsed());
    assert_eq!(up(), Some(1.0), "epoxy_target_up of b after rise");
    let ids: Vec<u8> = (0..4).map(|_| connect_id(addr).1).collect();
    assert!(
        ids.contains(&b'b'),
        "b gets no connections after coming back: {ids:?}"
    );
    assert!(b2.accepted() >= 1);
    let text = exit_cleanly(st.proxy);
    assert_eq!(
        text.matches(&down_line).count(),
        1,
        "DOWN should be logged once; stderr:\n{text}"
    );
}

// ---------------------------------------------------------------------------------------------
// Limits
// ---------------------------------------------------------------------------------------------

#[test]
fn per_app_limit_refuses_eleventh_while_other_app_serves() {
    let echo = echo_server();
    let st = start_cfg(
        "toml",
        2,
        &[],
        false,
        &format!(
            "[[app]]\nname = \"lim\"\nlisten = [\"{}\"]\ntargets = [\"{e}\"]\nmax_conns = 10\n\n\
             [[app]]\nname = \"free\"\nlisten = [\"{}\"]\ntargets = [\"{e}\"]\n",
            any_port(1),
            any_port(2),
            e = echo.addr()
        ),
    );
    let lim = st.app_addr("lim");
    let free = st.app_addr("free");
    let mut held: Vec<TcpStream> = Vec::new();
    for i in 0..10 {
        let mut c = connect(lim);
        assert_echo(&mut c, format!("conn {i}").as_bytes());
        held.push(c);
    }
    // The 11th: the TCP handshake may complete in the kernel, but no echo may come back
    // (within 1 s: a "not served" check, which slowness cannot fail).
    let eleventh = try_connect(lim, scaled_secs(5));
    let mut pending = match eleventh {
        Ok(mut c) => {
            let _ = c.write_all(b"eleventh");
            let mut buf = [0u8; 8];
            c.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
            match c.read(&mut buf) {
                Ok(n) if n > 0 => panic!("the 11th connection of app 'lim' was served"),
                _ => {}
            }
            Some(c)
        }
        Err(_) => None,
    };
    // The other app still serves.
    for i in 0..3 {
        let mut c = connect(free);
        assert_echo(&mut c, format!("free {i}").as_bytes());
    }
    // The app's own pairs still work.
    assert_echo(&mut held[0], b"still here");
    // Below the limit again, 'lim' accepts again (a queued 11th is served then).
    held.clear();
    if let Some(c) = pending.as_mut() {
        let mut buf = [0u8; 8];
        match read_exact_deadline(c, &mut buf, Instant::now() + scaled_secs(10)) {
            Ok(()) => assert_eq!(&buf, b"eleventh"),
            Err(e) => println!("note: the queued 11th was not served after the limit cleared: {e}"),
        }
    }
    let ok = wait_until(scaled_secs(10), || {
        try_connect(lim, scaled_secs(2))
            .and_then(|mut c| roundtrip(&mut c, b"again", scaled_secs(2)))
            .is_ok()
    });
    assert!(ok, "app 'lim' does not accept again after its pairs closed");
    drop(pending);
    exit_cleanly(st.proxy);
}

// ---------------------------------------------------------------------------------------------
// Seed-shaped files
// ---------------------------------------------------------------------------------------------

/// An id server on 127.0.0.1:PORT and, when IPv6 works, the same id on [::1]:PORT (targets
/// written as `localhost` may resolve to either).
fn id_server_dual(id: u8) -> (Server, Option<Server>) {
    for _ in 0..20 {
        let v4 = id_server(id);
        if !ipv6_available() {
            return (v4, None);
        }
        let v6addr: SocketAddr = format!("[::1]:{}", v4.addr().port()).parse().expect("v6");
        if let Ok(v6) = Server::try_start(v6addr, move |s, _| id_handler(s, id)) {
            return (v4, Some(v6));
        }
    }
    panic!("no port free on both 127.0.0.1 and [::1]");
}

#[test]
fn seed_json_file_routes_traffic() {
    let (t1, t2) = (id_server(1), id_server(2));
    let (t3, _t3v6) = id_server_dual(3);
    // Seed files give ports only (0 = any free port, on 0.0.0.0).
    let st = start_cfg(
        "json",
        3,
        &[],
        false,
        &format!(
            "{{\n  \"Apps\": [\n    {{\n      \"Name\": \"five-thousand\",\n      \"Ports\": [0, 0],\n      \
             \"Targets\": [\"{}\", \"{}\"]\n    }},\n    {{\n      \"Name\": \"six-thousand\",\n      \
             \"Ports\": [0],\n      \"Targets\": [\"localhost:{}\"]\n    }}\n  ]\n}}\n",
            t1.addr(),
            t2.addr(),
            t3.addr().port()
        ),
    );
    let five = st.app_addrs("five-thousand");
    assert_eq!(five.len(), 2, "{:?}", st.listeners);
    let mut first = Vec::new();
    for &addr in &five {
        for _ in 0..2 {
            let (_c, id) = connect_id(addr);
            assert!(
                id == 1 || id == 2,
                "five-thousand listener {addr} reached target {id}"
            );
            first.push(id);
        }
    }
    assert!(
        first.contains(&1) && first.contains(&2),
        "both targets used: {first:?}"
    );
    for _ in 0..2 {
        let (_c, id) = connect_id(st.app_addr("six-thousand"));
        assert_eq!(id, 3, "six-thousand reached target {id}");
    }
    exit_cleanly(st.proxy);
}

#[test]
fn seed_pipe_conf_file_routes_traffic() {
    let t1 = id_server(1);
    let (t2, _t2v6) = id_server_dual(2);
    // The pipe format names local ports 1..=65535 (no port 0), so this test holds two ports
    // for its whole life (`HeldPort`: bound with SO_REUSEPORT, never listening) and lets the
    // proxy listen on them beside the holders: with `--workers 2` the proxy binds with
    // SO_REUSEPORT too, which the kernel allows for sockets of the same user. The ports are
    // never free while the test runs, so nothing else can take them between our bind and
    // the proxy's; the holders do not listen, so every connection goes to the proxy.
    let (l1, l2) = (HeldPort::new(), HeldPort::new());
    let st = start_cfg(
        "conf",
        2,
        &["--workers", "2"],
        false,
        &format!(
            "# forwarder rules\n\n{} | 127.0.0.1 | {}\n{} | localhost | {}    # by name\n",
            l1.addr().port(),
            t1.addr().port(),
            l2.addr().port(),
            t2.addr().port()
        ),
    );
    assert_eq!(st.addr(0).port(), l1.addr().port());
    assert_eq!(st.addr(1).port(), l2.addr().port());
    for _ in 0..2 {
        let (_c, id) = connect_id(st.addr(0));
        assert_eq!(id, 1, "listener {} reached target {id}", st.addr(0));
        let (_c, id) = connect_id(st.addr(1));
        assert_eq!(id, 2, "listener {} reached target {id}", st.addr(1));
    }
    exit_cleanly(st.proxy);
}
