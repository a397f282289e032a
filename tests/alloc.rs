//! Design rule 3.7: nothing allocates between two `poll()` calls. This binary installs a
//! counting global allocator, embeds the proxy through the library API, and counts the
//! allocations made on the proxy's worker threads (`epoxy-worker-N`) while (1) relaying echo
//! traffic on an already-open connection and (2) serving a warm loop of short connections
//! (accept, upstream connect, one round trip, close). The test's own code keeps its buffers
//! pre-allocated (and its allocations count apart anyway: they are not on a worker thread).
//!
//! The counter is process-wide, so the tests take `SERIAL` and never overlap their windows.

#[path = "util/counting_alloc.rs"]
mod counting_alloc;

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::{Mutex, MutexGuard, mpsc};
use std::thread;
use std::time::{Duration, Instant};

use counting_alloc::CountingAlloc;
use epoxy::config::{AppConfig, Config, TargetConfig};

#[global_allocator]
static ALLOC: CountingAlloc = CountingAlloc::new();

const CHUNK: usize = 64 * 1024;
const WINDOW_BYTES: usize = 32 << 20;

/// Short connections before the measured ones (pools, slab, timer wheel warmed up).
const WARM_CONNS: usize = 200;
/// Short connections in the measured window.
const MEASURED_CONNS: usize = 200;

/// Serializes the tests of this binary: the allocation counter is global.
fn serial() -> MutexGuard<'static, ()> {
    static SERIAL: Mutex<()> = Mutex::new(());
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

/// Bounds on waiting, scaled like the integration tests' (`EPOXY_TEST_TIME_SCALE`).
fn scaled_secs(n: u64) -> Duration {
    let scale = std::env::var("EPOXY_TEST_TIME_SCALE")
        .ok()
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|f| f.is_finite() && *f > 0.0)
        .unwrap_or(1.0);
    Duration::from_secs(n).mul_f64(scale)
}

/// An echo upstream on 127.0.0.1:0: one thread per connection, fixed buffer.
fn echo_upstream() -> SocketAddr {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind echo");
    let addr = l.local_addr().expect("echo addr");
    thread::Builder::new()
        .name("echo-accept".into())
        .spawn(move || {
            for conn in l.incoming() {
                let Ok(mut s) = conn else { continue };
                let _ = s.set_read_timeout(Some(Duration::from_secs(60)));
                let _ = s.set_write_timeout(Some(Duration::from_secs(60)));
                let _ = s.set_nodelay(true);
                let _ = thread::Builder::new()
                    .name("echo-conn".into())
                    .spawn(move || {
                        let mut buf = vec![0u8; CHUNK];
                        loop {
                            match s.read(&mut buf) {
                                Ok(0) | Err(_) => {
                                    let _ = s.shutdown(Shutdown::Write);
                                    return;
                                }
                                Ok(n) => {
                                    if s.write_all(&buf[..n]).is_err() {
                                        return;
                                    }
                                }
                            }
                        }
                    });
            }
        })
        .expect("spawn echo accept");
    addr
}

fn client(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect_timeout(&addr, scaled_secs(10)).expect("connect proxy");
    s.set_nodelay(true).unwrap();
    s.set_read_timeout(Some(scaled_secs(20))).unwrap();
    s.set_write_timeout(Some(scaled_secs(20))).unwrap();
    s
}

fn fill(buf: &mut [u8], seed: u64) {
    let mut x = seed | 1;
    for b in buf.iter_mut() {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *b = x as u8;
    }
}

/// Echoes `total` bytes in `send`-sized chunks; returns how many chunks came back wrong.
/// Does not allocate (fixed buffers, std sockets, no formatting).
fn echo_bytes(s: &mut TcpStream, send: &[u8], back: &mut [u8], total: usize) -> Result<usize, ()> {
    let mut bad = 0usize;
    let mut done = 0usize;
    while done < total {
        if s.write_all(send).is_err() {
            return Err(());
        }
        if s.read_exact(back).is_err() {
            return Err(());
        }
        if back != send {
            bad += 1;
        }
        done += send.len();
    }
    Ok(bad)
}

fn worker_threads() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/task") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read(e.path().join("comm"))
                .map(|c| c.starts_with(counting_alloc::WORKER_PREFIX))
                .unwrap_or(false)
        })
        .count()
}

/// Starts the proxy (one app on 127.0.0.1:0 in front of an echo upstream) and checks that
/// the counter can see its worker threads. Returns the proxy and its listener address.
fn start_proxy() -> (epoxy::Proxy, SocketAddr) {
    start_proxy_with(|_| {})
}

/// `start_proxy` with the app's settings changed by `edit`.
fn start_proxy_with(edit: impl FnOnce(&mut AppConfig)) -> (epoxy::Proxy, SocketAddr) {
    let upstream = echo_upstream();
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let mut app = AppConfig::new("a", vec![listen], vec![TargetConfig::new(upstream)]);
    edit(&mut app);
    let config = Config {
        apps: vec![app],
        max_conns: Some(100),
        ..Config::default()
    };
    let proxy = epoxy::Proxy::start(config).expect("start proxy");
    let addrs = proxy.local_addrs();
    assert_eq!(addrs.len(), 1, "one listener expected: {addrs:?}");
    let addr = addrs[0];
    assert_ne!(addr.port(), 0, "local_addrs must resolve port 0");

    // Without a named worker thread the count below would be vacuous. A new thread sets its
    // OS name itself as it starts: wait for it (bounded; the sleep paces the polling).
    let deadline = Instant::now() + scaled_secs(10);
    while worker_threads() == 0 && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    assert!(
        worker_threads() >= 1,
        "no thread named epoxy-worker-* in this process"
    );

    // The counter must see allocations on a thread with that name.
    ALLOC.start_window();
    thread::Builder::new()
        .name("epoxy-worker-selftest".into())
        .spawn(|| {
            let v: Vec<u8> = Vec::with_capacity(4096);
            std::hint::black_box(v);
        })
        .unwrap()
        .join()
        .unwrap();
    let (seen, _) = ALLOC.end_window();
    assert!(
        seen >= 1,
        "counting allocator missed an allocation on a worker-named thread"
    );
    (proxy, addr)
}

/// The final totals the tests check.
struct Totals {
    accepted: u64,
    bytes_client_to_upstream: u64,
    bytes_upstream_to_client: u64,
}

/// Shuts the proxy down and returns its final totals (within a scaled 10 s).
fn stop_proxy(proxy: epoxy::Proxy) -> Totals {
    proxy.shutdown();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let s = proxy.join();
        let _ = tx.send(Totals {
            accepted: s.accepted,
            bytes_client_to_upstream: s.bytes_client_to_upstream,
            bytes_upstream_to_client: s.bytes_upstream_to_client,
        });
    });
    rx.recv_timeout(scaled_secs(10))
        .expect("proxy did not stop in time after shutdown()")
}

#[test]
fn relay_does_not_allocate_on_worker_threads() {
    let _serial = serial();
    let (proxy, addr) = start_proxy();

    let mut send = vec![0u8; CHUNK];
    let mut back = vec![0u8; CHUNK];
    fill(&mut send, 0xA110C);

    // Warm-up: a few connections and a few MiB.
    for i in 0..4 {
        let mut c = client(addr);
        let bad = echo_bytes(&mut c, &send, &mut back, 1 << 20).expect("warm-up echo");
        assert_eq!(bad, 0, "warm-up connection {i} echoed different bytes");
        c.shutdown(Shutdown::Write).unwrap();
        let mut one = [0u8; 1];
        assert_eq!(c.read(&mut one).expect("EOF after warm-up"), 0);
    }
    let mut c = client(addr);
    let bad = echo_bytes(&mut c, &send, &mut back, 2 << 20).expect("warm-up on measured conn");
    assert_eq!(bad, 0);

    // The window: 32 MiB of echo on the open connection.
    ALLOC.start_window();
    let res = echo_bytes(&mut c, &send, &mut back, WINDOW_BYTES);
    let (on_workers, elsewhere) = ALLOC.end_window();

    assert_eq!(
        res,
        Ok(0),
        "echo through the proxy failed or returned different bytes"
    );
    eprintln!(
        "allocations during {} MiB of relay: {on_workers} on worker threads, {elsewhere} elsewhere",
        WINDOW_BYTES >> 20
    );
    assert_eq!(
        on_workers, 0,
        "the proxy's worker threads allocated {on_workers} times while relaying"
    );

    close_and_check_totals(c, proxy, (WINDOW_BYTES + (4 << 20) + (2 << 20)) as u64);
}

/// Half-close the measured connection, read its EOF, stop the proxy and check that it counted
/// `expected` bytes each way.
fn close_and_check_totals(mut c: TcpStream, proxy: epoxy::Proxy, expected: u64) {
    c.shutdown(Shutdown::Write).unwrap();
    let mut one = [0u8; 1];
    assert_eq!(c.read(&mut one).expect("EOF at the end"), 0);
    drop(c);
    let summary = stop_proxy(proxy);
    assert_eq!(summary.bytes_client_to_upstream, expected);
    assert_eq!(summary.bytes_upstream_to_client, expected);
}

/// Pipe fds open in this process (the proxy runs in it: its splice pipes).
fn pipe_fds_here() -> usize {
    let Ok(dir) = std::fs::read_dir("/proc/self/fd") else {
        return 0;
    };
    dir.filter_map(|e| e.ok())
        .filter(|e| {
            std::fs::read_link(e.path())
                .map(|l| l.to_string_lossy().starts_with("pipe:"))
                .unwrap_or(false)
        })
        .count()
}

/// `splice = "auto"` (the default) moving a direction to a pipe and back, over and over:
/// 8 cycles of a 1 MiB bulk echo (64 KiB writes: bulk, through a pipe) then 50 round trips
/// of 100 bytes (quiet: back to the buffer). The switches allocate nothing either.
#[test]
fn adaptive_switching_does_not_allocate_on_worker_threads() {
    let _serial = serial();
    let before = pipe_fds_here();
    let (proxy, addr) = start_proxy();

    let mut send = vec![0u8; CHUNK];
    let mut back = vec![0u8; CHUNK];
    fill(&mut send, 0x5B11CE);
    let mut small = [0u8; 100];
    let mut small_back = [0u8; 100];
    fill(&mut small, 0x5B11CF);
    let mut c = client(addr);
    let cycle = |c: &mut TcpStream, send: &[u8], back: &mut [u8], sb: &mut [u8]| {
        let bulk = echo_bytes(c, send, back, 1 << 20);
        let sparse = echo_bytes(c, &small, sb, 50 * small.len());
        (bulk, sparse)
    };
    // Warm-up: pipes are created (and kept for reuse) on the first bulk phases.
    for _ in 0..2 {
        assert_eq!(
            cycle(&mut c, &send, &mut back, &mut small_back),
            (Ok(0), Ok(0))
        );
    }
    let pipes = pipe_fds_here().saturating_sub(before);
    assert!(
        pipes >= 2,
        "no splice pipe appeared during bulk echo (pipe fds {pipes}): the window would not \
         cover the pipe path"
    );

    ALLOC.start_window();
    let mut results = [(Ok(0), Ok(0)); 8];
    for r in results.iter_mut() {
        *r = cycle(&mut c, &send, &mut back, &mut small_back);
    }
    let (on_workers, elsewhere) = ALLOC.end_window();
    for (i, r) in results.iter().enumerate() {
        assert_eq!(
            *r,
            (Ok(0), Ok(0)),
            "cycle {i}: echo failed or came back different"
        );
    }
    eprintln!(
        "allocations during 8 bulk/sparse cycles: {on_workers} on worker threads, {elsewhere} elsewhere"
    );
    assert_eq!(
        on_workers, 0,
        "the worker threads allocated {on_workers} times across buffer/pipe switches"
    );

    close_and_check_totals(c, proxy, 10 * ((1u64 << 20) + 50 * 100));
}

/// One short connection: connect, one round trip of `send`, half-close, read the EOF, close.
/// Does not allocate (fixed buffers, std sockets, no formatting).
fn short_connection(addr: SocketAddr, send: &[u8], back: &mut [u8]) -> Result<bool, ()> {
    let mut c = TcpStream::connect_timeout(&addr, scaled_secs(10)).map_err(|_| ())?;
    let _ = c.set_nodelay(true);
    c.set_read_timeout(Some(scaled_secs(20))).map_err(|_| ())?;
    c.write_all(send).map_err(|_| ())?;
    c.read_exact(back).map_err(|_| ())?;
    c.shutdown(Shutdown::Write).map_err(|_| ())?;
    let mut one = [0u8; 1];
    let eof = matches!(c.read(&mut one), Ok(0));
    Ok(back == send && eof)
}

/// Waits (bounded) until the proxy has no live pair, so that a window also covers the
/// closing of the last connection. Returns whether it got there.
fn wait_idle(proxy: &epoxy::Proxy) -> bool {
    let deadline = Instant::now() + scaled_secs(10);
    loop {
        if proxy.summary().active == 0 {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        // Paces the polling; the result is decided by the condition.
        thread::sleep(Duration::from_millis(5));
    }
}

/// A connection function of the loops below: one short connection, `Ok(true)` if intact.
type ShortConn = fn(SocketAddr, &[u8], &mut [u8]) -> Result<bool, ()>;

/// Warm up with `WARM_CONNS` runs of `conn`, then count allocations over `MEASURED_CONNS`
/// more, up to the close of the last pair. Asserts that every connection succeeded and that
/// the worker threads allocated nothing; `what` names the loop in messages.
fn assert_loop_allocates_nothing(
    proxy: &epoxy::Proxy,
    addr: SocketAddr,
    conn: ShortConn,
    seed: u64,
    what: &str,
) {
    let mut send = [0u8; 256];
    let mut back = [0u8; 256];
    fill(&mut send, seed);
    for i in 0..WARM_CONNS {
        assert_eq!(
            conn(addr, &send, &mut back),
            Ok(true),
            "warm-up {what} {i} failed"
        );
    }
    assert!(wait_idle(proxy), "warm-up pairs still live");
    ALLOC.start_window();
    let mut failed = 0usize;
    for _ in 0..MEASURED_CONNS {
        if conn(addr, &send, &mut back) != Ok(true) {
            failed += 1;
        }
    }
    let idle = wait_idle(proxy);
    let (on_workers, elsewhere) = ALLOC.end_window();
    assert_eq!(failed, 0, "{failed} of {MEASURED_CONNS} {what} failed");
    assert!(idle, "measured pairs still live after the loop");
    eprintln!(
        "allocations during {MEASURED_CONNS} {what}: {on_workers} on worker threads, {elsewhere} elsewhere"
    );
    assert_eq!(
        on_workers,
        0,
        "the proxy's worker threads allocated {on_workers} times ({:.2} per connection) during \
         {MEASURED_CONNS} {what} (accept, upstream connect, one round trip, close)",
        on_workers as f64 / MEASURED_CONNS as f64
    );
}

#[test]
fn short_connections_do_not_allocate_on_worker_threads() {
    let _serial = serial();
    let (proxy, addr) = start_proxy();
    assert_loop_allocates_nothing(&proxy, addr, short_connection, 0x5407, "short connections");
    let summary = stop_proxy(proxy);
    let total = (WARM_CONNS + MEASURED_CONNS) as u64;
    assert_eq!(summary.accepted, total, "connections accepted");
    assert_eq!(summary.bytes_client_to_upstream, total * 256);
    assert_eq!(summary.bytes_upstream_to_client, total * 256);
}

/// Like `short_connection`, for an app with `accept_proxy` and `send_proxy = "v2"` in front of
/// an echo upstream: the client sends a PROXY v1 header before its bytes, and gets back the
/// 28-byte v2 header epoxy wrote toward the upstream, then its bytes.
fn short_connection_proxied(addr: SocketAddr, send: &[u8], back: &mut [u8]) -> Result<bool, ()> {
    const HDR: &[u8] = b"PROXY TCP4 10.1.2.3 127.0.0.1 40000 80\r\n";
    let mut c = TcpStream::connect_timeout(&addr, scaled_secs(10)).map_err(|_| ())?;
    let _ = c.set_nodelay(true);
    c.set_read_timeout(Some(scaled_secs(20))).map_err(|_| ())?;
    c.write_all(HDR).map_err(|_| ())?;
    c.write_all(send).map_err(|_| ())?;
    let mut v2 = [0u8; 28];
    c.read_exact(&mut v2).map_err(|_| ())?;
    c.read_exact(back).map_err(|_| ())?;
    c.shutdown(Shutdown::Write).map_err(|_| ())?;
    let mut one = [0u8; 1];
    let eof = matches!(c.read(&mut one), Ok(0));
    // The v2 header carries the source from the v1 header: 10.1.2.3:40000.
    let src_ok = v2[..12] == *b"\r\n\r\n\0\r\nQUIT\n" && v2[16..20] == [10, 1, 2, 3];
    Ok(back == send && eof && src_ok)
}

#[test]
fn edge_features_do_not_allocate_on_worker_threads() {
    let _serial = serial();
    let allow: Vec<epoxy::config::Cidr> = (0..1000)
        .map(|i| epoxy::config::Cidr::parse(&format!("10.{}.{}.0/24", i / 250, i % 250)).unwrap())
        .collect();
    let (proxy, addr) = start_proxy_with(|a| {
        a.accept_proxy = true;
        a.send_proxy = Some(epoxy::config::ProxyVersion::V2);
        a.allow = allow;
        a.max_conns_per_source = Some(10);
    });
    assert_loop_allocates_nothing(
        &proxy,
        addr,
        short_connection_proxied,
        0x9901,
        "proxied connections (accept_proxy, send_proxy v2, 1000-entry allow list)",
    );
    let summary = stop_proxy(proxy);
    let total = (WARM_CONNS + MEASURED_CONNS) as u64;
    // Payload only: the PROXY headers are not counted toward the upstream.
    assert_eq!(summary.bytes_client_to_upstream, total * 256);
    assert_eq!(summary.bytes_upstream_to_client, total * (256 + 28));
}
