//! `proxy selftest [--json]`: checks, on the host it runs on, that what epoxy relies on
//! behaves as it does where epoxy was built and tested. Every check runs a real, in-process
//! epoxy ([`Proxy::start`] on 127.0.0.1 port 0, or ::1) against loopback servers started
//! here, with a deadline; nothing leaves the loopback interface. EMFILE recovery runs in a
//! child (this binary re-executed with a hidden flag) whose fd limit is lowered after start,
//! so that the parent's sockets do not count against it. Exit status 0 when every check
//! passed or was skipped (IPv6 only is skippable), 1 otherwise.
//!
//! Never touches a running proxy, and never panics on what the host does: each failure is a
//! FAIL with one line why.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::config::{AppConfig, Config, DEFAULT_MAX_CONNS, TargetConfig, Workers};
use crate::control::{Proxy, auto_workers, effective_max_conns};
use crate::outcome::PauseCause;
use crate::sys;

/// The hidden flag that runs the EMFILE child.
pub const EMFILE_CHILD_FLAG: &str = "--emfile-child";

/// The result of one check.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Pass,
    Fail,
    Skip,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Pass => "PASS",
            Outcome::Fail => "FAIL",
            Outcome::Skip => "SKIP",
        }
    }
}

/// One check as reported.
#[derive(Debug, Clone)]
pub struct Check {
    pub name: &'static str,
    pub outcome: Outcome,
    pub detail: String,
    pub elapsed: Duration,
}

type Verdict = Result<(Outcome, String), String>;
type CheckFn = fn() -> Verdict;

fn pass(detail: String) -> Verdict {
    Ok((Outcome::Pass, detail))
}

/// `what: error` for a failed step.
fn step<T>(what: &str, r: io::Result<T>) -> Result<T, String> {
    r.map_err(|e| format!("{what}: {e}"))
}

const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The fewest pairs an fd limit must leave room for to pass.
pub const MIN_PAIRS: usize = 1000;

fn loopback4() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

/// A proxy of one app listening on `listen` in front of `target`.
fn start_proxy(
    listen: SocketAddr,
    target: SocketAddr,
    workers: usize,
    splice: bool,
) -> Result<Proxy, String> {
    let mut app = AppConfig::new("selftest", vec![listen], vec![TargetConfig::new(target)]);
    app.splice = splice;
    let config = Config {
        apps: vec![app],
        workers: Workers::Count(workers),
        max_conns: Some(1024),
        log_interval: None,
        ..Config::default()
    };
    Proxy::start(config).map_err(|e| format!("start epoxy: {e}"))
}

fn first_addr(p: &Proxy) -> Result<SocketAddr, String> {
    p.local_addrs()
        .first()
        .copied()
        .ok_or_else(|| "epoxy has no listener".to_string())
}

fn connect(addr: SocketAddr) -> Result<TcpStream, String> {
    let s = step(
        &format!("connect {addr}"),
        TcpStream::connect_timeout(&addr, IO_TIMEOUT),
    )?;
    step("set timeouts", s.set_read_timeout(Some(IO_TIMEOUT)))?;
    step("set timeouts", s.set_write_timeout(Some(IO_TIMEOUT)))?;
    Ok(s)
}

/// A loopback server on `addr` that runs `handler` for each connection (in its own thread,
/// with I/O timeouts). The accept thread ends with the process.
fn serve(
    addr: SocketAddr,
    handler: impl Fn(TcpStream) + Send + Sync + 'static,
) -> io::Result<SocketAddr> {
    let l = TcpListener::bind(addr)?;
    let bound = l.local_addr()?;
    let handler = Arc::new(handler);
    thread::Builder::new()
        .name("selftest-server".into())
        .spawn(move || {
            for s in l.incoming().flatten() {
                let _ = s.set_read_timeout(Some(IO_TIMEOUT));
                let _ = s.set_write_timeout(Some(IO_TIMEOUT));
                let h = handler.clone();
                let _ = thread::Builder::new()
                    .name("selftest-conn".into())
                    .spawn(move || h(s));
            }
        })?;
    Ok(bound)
}

fn echo(mut s: TcpStream) {
    let mut buf = [0u8; 16 * 1024];
    loop {
        match s.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                if s.write_all(&buf[..n]).is_err() {
                    return;
                }
            }
        }
    }
    let _ = s.shutdown(Shutdown::Write);
}

fn echo_server(addr: SocketAddr) -> io::Result<SocketAddr> {
    serve(addr, echo)
}

/// Byte `i` of the deterministic test stream.
fn pattern(i: u64) -> u8 {
    (i % 251) as u8 ^ ((i >> 12) as u8)
}

fn roundtrip(addr: SocketAddr, msg: &[u8]) -> Result<(), String> {
    let mut c = connect(addr)?;
    step("write", c.write_all(msg))?;
    let mut back = vec![0u8; msg.len()];
    step("read the echo", c.read_exact(&mut back))?;
    if back != msg {
        return Err("echo differs from what was sent".into());
    }
    Ok(())
}

fn check_half_close() -> Verdict {
    let (tx, rx) = mpsc::channel::<Vec<u8>>();
    let tx = std::sync::Mutex::new(tx);
    let backend = step(
        "bind backend",
        serve(loopback4(), move |mut s| {
            let mut first = [0u8; 1];
            // The client says which side closes first: 'c' (client) or 'u' (upstream).
            if s.read_exact(&mut first).is_err() {
                return;
            }
            let mut got = Vec::new();
            if first[0] == b'c' {
                let _ = s.read_to_end(&mut got);
                let _ = s.write_all(format!("got {} bytes", got.len()).as_bytes());
            } else {
                let _ = s.write_all(b"hello from upstream");
                let _ = s.shutdown(Shutdown::Write);
                let _ = s.read_to_end(&mut got);
                if let Ok(tx) = tx.lock() {
                    let _ = tx.send(got);
                }
            }
        }),
    )?;
    let proxy = start_proxy(loopback4(), backend, 1, false)?;
    let addr = first_addr(&proxy)?;

    // Client closes first: its EOF reaches upstream, and the answer still comes back.
    let mut c = connect(addr)?;
    step("write", c.write_all(b"c0123456789"))?;
    step("shutdown(Write)", c.shutdown(Shutdown::Write))?;
    let mut answer = String::new();
    step("read the answer", c.read_to_string(&mut answer))?;
    if answer != "got 10 bytes" {
        return Err(format!(
            "client-first: upstream answered {answer:?} (its EOF was not forwarded, or the reply was lost)"
        ));
    }

    // Upstream closes first: its EOF reaches the client, who can still send.
    let mut c = connect(addr)?;
    step("write", c.write_all(b"u"))?;
    let mut hello = String::new();
    step("read to upstream's EOF", c.read_to_string(&mut hello))?;
    if hello != "hello from upstream" {
        return Err(format!("upstream-first: client read {hello:?}"));
    }
    step("write after EOF", c.write_all(b"late words"))?;
    step("shutdown(Write)", c.shutdown(Shutdown::Write))?;
    let late = rx
        .recv_timeout(IO_TIMEOUT)
        .map_err(|_| "upstream-first: upstream never saw the client's EOF".to_string())?;
    if late != b"late words" {
        return Err(format!(
            "upstream-first: upstream got {:?} after its own EOF",
            String::from_utf8_lossy(&late)
        ));
    }
    pass("client-first and upstream-first: EOF forwarded, the other direction kept flowing".into())
}

fn check_reset() -> Verdict {
    let (tx, rx) = mpsc::channel::<io::ErrorKind>();
    let tx = std::sync::Mutex::new(tx);
    let (armed_tx, armed_rx) = mpsc::channel::<()>();
    let armed_tx = std::sync::Mutex::new(armed_tx);
    let backend = step(
        "bind backend",
        serve(loopback4(), move |mut s| {
            let mut first = [0u8; 1];
            if s.read_exact(&mut first).is_err() {
                return;
            }
            if first[0] == b'u' {
                // Upstream resets.
                let _ = s.write_all(&[7u8; 1000]);
                let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
                drop(s);
            } else {
                // The client will reset once upstream has its first byte: what comes next?
                if let Ok(armed) = armed_tx.lock() {
                    let _ = armed.send(());
                }
                let mut buf = [0u8; 1024];
                let kind = loop {
                    match s.read(&mut buf) {
                        Ok(0) => break io::ErrorKind::UnexpectedEof,
                        Ok(_) => {}
                        Err(e) => break e.kind(),
                    }
                };
                if let Ok(tx) = tx.lock() {
                    let _ = tx.send(kind);
                }
            }
        }),
    )?;
    let proxy = start_proxy(loopback4(), backend, 1, false)?;
    let addr = first_addr(&proxy)?;

    let mut c = connect(addr)?;
    step("write", c.write_all(b"u"))?;
    let mut buf = [0u8; 4096];
    let seen = loop {
        match c.read(&mut buf) {
            Ok(0) => break Err("client saw a clean EOF instead of a reset".to_string()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break Ok(()),
            Err(e) => break Err(format!("client saw {e} instead of a reset")),
        }
    };
    seen.map_err(|e| format!("upstream reset: {e}"))?;

    let c = connect(addr)?;
    (&c).write_all(b"c").map_err(|e| format!("write: {e}"))?;
    // Reset only once the pair is whole: upstream has the first byte.
    armed_rx
        .recv_timeout(IO_TIMEOUT)
        .map_err(|_| "client reset: the first byte never reached upstream".to_string())?;
    step(
        "set SO_LINGER 0",
        socket2::SockRef::from(&c).set_linger(Some(Duration::ZERO)),
    )?;
    drop(c);
    match rx.recv_timeout(IO_TIMEOUT) {
        Ok(io::ErrorKind::ConnectionReset) => {}
        Ok(other) => return Err(format!("client reset: upstream saw {other:?}, not a reset")),
        Err(_) => return Err("client reset: upstream saw nothing".into()),
    }
    pass("a reset on either side reaches the other side as a reset (not a clean EOF)".into())
}

/// The most payload the kernel may hold between a backend that writes and a client that
/// reads nothing, through a proxy: each of the two connections has a sender's and a
/// receiver's socket buffer, and the proxy's are autotuned up to `tcp_wmem` / `tcp_rmem`'s
/// maximum (their third field; Linux's defaults, 4 and 6 MiB, where unreadable). On a host
/// with `tcp_rmem` at 32 MiB that is over 64 MiB, so the bound cannot be a constant.
fn kernel_buffer_bound() -> u64 {
    let max_of = |name: &str, default: u64| {
        std::fs::read_to_string(format!("/proc/sys/net/ipv4/{name}"))
            .ok()
            .and_then(|s| s.split_whitespace().nth(2).and_then(|v| v.parse().ok()))
            .unwrap_or(default)
    };
    2 * max_of("tcp_rmem", 6 << 20) + 2 * max_of("tcp_wmem", 4 << 20)
}

fn check_slow_reader() -> Verdict {
    // Room for everything the kernel may buffer plus epoxy's own share (8 KiB buffers and at
    // most one 256 KiB pipe per direction: 1 MiB is ample). An unbounded proxy would take
    // the whole stream, twice the bound.
    let bound = kernel_buffer_bound() + (1 << 20);
    let total: u64 = (2 * bound).max(64 << 20).next_multiple_of(64 * 1024);
    let written = Arc::new(AtomicU64::new(0));
    let w2 = written.clone();
    let backend = step(
        "bind backend",
        serve(loopback4(), move |mut s| {
            let _ = s.set_write_timeout(Some(Duration::from_secs(10)));
            let mut buf = vec![0u8; 64 * 1024];
            let mut sent = 0u64;
            while sent < total {
                for (i, b) in buf.iter_mut().enumerate() {
                    *b = pattern(sent + i as u64);
                }
                if s.write_all(&buf).is_err() {
                    return;
                }
                sent += buf.len() as u64;
                w2.store(sent, Relaxed);
            }
        }),
    )?;
    let proxy = start_proxy(loopback4(), backend, 1, false)?;
    let addr = first_addr(&proxy)?;
    let mut c = connect(addr)?;
    // Read nothing until upstream stalls: it must, long before the whole stream is sent.
    let deadline = Instant::now() + Duration::from_secs(3);
    let mut last = 0;
    let mut still_since = Instant::now();
    while Instant::now() < deadline {
        thread::sleep(Duration::from_millis(20));
        let now = written.load(Relaxed);
        if now != last {
            last = now;
            still_since = Instant::now();
        } else if now > 0 && still_since.elapsed() >= Duration::from_millis(300) {
            break;
        }
    }
    let stalled_at = written.load(Relaxed);
    if stalled_at >= bound {
        return Err(format!(
            "upstream wrote {} MiB to a client that reads nothing, over the {} MiB that socket buffers can hold: buffering is not bounded",
            stalled_at >> 20,
            bound >> 20
        ));
    }
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    while got < total {
        let n = step("read", c.read(&mut buf))?;
        if n == 0 {
            return Err(format!("stream ended after {got} of {total} bytes"));
        }
        if let Some(i) = (0..n).find(|&i| buf[i] != pattern(got + i as u64)) {
            return Err(format!("byte {} differs", got + i as u64));
        }
        got += n as u64;
    }
    pass(format!(
        "upstream stalled after {:.1} MiB while the client read nothing (socket buffers, not epoxy; they may hold {} MiB); then all {} MiB arrived intact",
        stalled_at as f64 / (1 << 20) as f64,
        bound >> 20,
        total >> 20
    ))
}

fn check_splice() -> Verdict {
    // splice(2) itself: socket -> pipe, then read the pipe.
    let l = step("bind", TcpListener::bind(loopback4()))?;
    let a = step("connect", TcpStream::connect(step("addr", l.local_addr())?))?;
    let (b, _) = step("accept", l.accept())?;
    let data: Vec<u8> = (0..32 * 1024).map(pattern).collect();
    step("write", (&a).write_all(&data))?;
    let pipe = step("pipe2", sys::pipe())?;
    let mut moved = 0;
    let deadline = Instant::now() + IO_TIMEOUT;
    use std::os::fd::AsRawFd;
    while moved < data.len() {
        match sys::splice(b.as_raw_fd(), pipe.w.as_raw_fd(), data.len() - moved) {
            Ok(0) => return Err("splice: EOF before the data".into()),
            Ok(n) => moved += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && Instant::now() < deadline => {
                thread::sleep(Duration::from_millis(1));
            }
            Err(e) => {
                return Err(format!(
                    "splice(2) socket -> pipe: {e} (use the default relay, not --splice)"
                ));
            }
        }
    }
    let mut out = vec![0u8; data.len()];
    let mut r = std::fs::File::from(pipe.r);
    step("read pipe", r.read_exact(&mut out))?;
    if out != data {
        return Err("splice(2) moved the wrong bytes".into());
    }

    // Through epoxy with --splice: 8 MiB each way through an echo server.
    const TOTAL: u64 = 8 << 20;
    let backend = step("bind echo", echo_server(loopback4()))?;
    let proxy = start_proxy(loopback4(), backend, 1, true)?;
    let addr = first_addr(&proxy)?;
    let c = connect(addr)?;
    let mut w = step("clone", c.try_clone())?;
    let writer = thread::spawn(move || -> io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        let mut sent = 0u64;
        while sent < TOTAL {
            for (i, b) in buf.iter_mut().enumerate() {
                *b = pattern(sent + i as u64);
            }
            w.write_all(&buf)?;
            sent += buf.len() as u64;
        }
        w.shutdown(Shutdown::Write)
    });
    let mut r = c;
    let mut buf = vec![0u8; 256 * 1024];
    let mut got = 0u64;
    loop {
        let n = step("read", r.read(&mut buf))?;
        if n == 0 {
            break;
        }
        if let Some(i) = (0..n).find(|&i| buf[i] != pattern(got + i as u64)) {
            return Err(format!("--splice: byte {} differs", got + i as u64));
        }
        got += n as u64;
    }
    match writer.join() {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(format!("--splice: write: {e}")),
        Err(_) => return Err("--splice: writer failed".into()),
    }
    if got != TOTAL {
        return Err(format!("--splice: {got} of {TOTAL} bytes came back"));
    }
    pass(format!(
        "splice(2) socket -> pipe works; {} MiB echoed through epoxy --splice intact",
        TOTAL >> 20
    ))
}

fn check_reuseport() -> Verdict {
    let backend = step("bind echo", echo_server(loopback4()))?;
    let proxy = start_proxy(loopback4(), backend, 2, false)?;
    let addr = first_addr(&proxy)?;
    for i in 0..40 {
        roundtrip(addr, format!("conn {i}").as_bytes())?;
    }
    let per_worker: Vec<u64> = proxy
        .view()
        .workers
        .iter()
        .map(|w| w.accepted.get())
        .collect();
    if per_worker.iter().filter(|&&n| n > 0).count() < 2 {
        return Err(format!(
            "40 connections to 2 SO_REUSEPORT listeners all went to one: {per_worker:?}"
        ));
    }
    pass(format!(
        "40 connections spread over 2 workers: {per_worker:?}"
    ))
}

fn check_ipv6() -> Verdict {
    let v6: SocketAddr = SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, 0));
    let backend = match echo_server(v6) {
        Ok(a) => a,
        Err(e) => return Ok((Outcome::Skip, format!("no IPv6 loopback here: {e}"))),
    };
    let proxy = start_proxy(v6, backend, 1, false)?;
    let addr = first_addr(&proxy)?;
    roundtrip(addr, b"over ::1")?;
    pass(format!("listen and connect on {addr}"))
}

fn check_fd_limit() -> Verdict {
    let nofile = step("raise RLIMIT_NOFILE", sys::raise_nofile_limit())?;
    let room = fd_room(nofile, 1);
    if room < MIN_PAIRS {
        return Err(format!(
            "open-files limit {nofile} leaves room for only {room} pairs (< {MIN_PAIRS}); raise it (ulimit -n, LimitNOFILE=)"
        ));
    }
    let default = if room >= DEFAULT_MAX_CONNS {
        format!("the default max_conns {DEFAULT_MAX_CONNS} fits")
    } else {
        format!("the default max_conns {DEFAULT_MAX_CONNS} is lowered to {room}")
    };
    pass(format!(
        "open-files limit {nofile}: room for {room} pairs ({} with the admin endpoint); {default}",
        fd_room(nofile, 1 + crate::admin::FD_BUDGET as usize)
    ))
}

/// The pairs the fd limit alone leaves room for (one worker, one listener plus `reserved`,
/// and the pipes of the default `splice = "auto"`).
fn fd_room(nofile: u64, reserved: usize) -> usize {
    let cfg = Config {
        max_conns: Some(usize::MAX / 4),
        apps: vec![AppConfig::new("fd", Vec::new(), Vec::new())],
        ..Config::default()
    };
    let pipes = 2 * crate::control::auto_pipes_per_worker(&cfg);
    effective_max_conns(&cfg, nofile, reserved + pipes, None).0
}

fn root_note() -> String {
    let root = sys::cgroup_root();
    if root == std::path::Path::new("/") {
        String::new()
    } else {
        format!(" (cgroup root {})", root.display())
    }
}

fn check_cgroup_cpu() -> Verdict {
    let cpus = sys::allowed_cpus().map(|c| c.len()).unwrap_or(1);
    let quota = sys::cgroup_cpu_quota();
    let workers = auto_workers(cpus, quota);
    let what = match quota {
        Some(q) => format!("CPU quota {q} CPUs"),
        None => "no CPU quota".into(),
    };
    pass(format!(
        "{what}, {cpus} usable CPU(s): workers auto = {workers}{}",
        root_note()
    ))
}

fn check_cgroup_memory() -> Verdict {
    let limit = sys::cgroup_memory_limit();
    let cfg = Config {
        max_conns: Some(usize::MAX / 4),
        ..Config::default()
    };
    let (mem_fit, _) = effective_max_conns(&cfg, u64::MAX / 4, 0, limit);
    let nofile = sys::raise_nofile_limit().unwrap_or(1024);
    let (default_fit, _) = effective_max_conns(&Config::default(), nofile, 1, limit);
    match limit {
        Some(m) => pass(format!(
            "memory limit {} MiB: buffers fit max_conns {mem_fit}; the default max_conns becomes {default_fit}{}",
            m >> 20,
            root_note()
        )),
        None => pass(format!(
            "no memory limit: max_conns {default_fit} (fd limit and default){}",
            root_note()
        )),
    }
}

/// Run the EMFILE child and judge it.
fn check_emfile() -> Verdict {
    let exe = step("find this binary", std::env::current_exe())?;
    let backend = step("bind echo", echo_server(loopback4()))?;
    let mut child = step(
        "start the child",
        Command::new(&exe)
            .args(["selftest", EMFILE_CHILD_FLAG, &backend.to_string()])
            .env("RUST_LOG", "off")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn(),
    )?;
    let result = drive_emfile_child(&mut child);
    drop(child.stdin.take());
    let deadline = Instant::now() + IO_TIMEOUT;
    let status = loop {
        match child.try_wait() {
            Ok(Some(s)) => break Some(s),
            Ok(None) if Instant::now() < deadline => thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
        }
    };
    let (detail, lines) = result?;
    if status.is_none_or(|s| !s.success()) {
        return Err(format!("the child did not exit cleanly ({status:?})"));
    }
    let emfile = lines
        .iter()
        .find_map(|l| l.strip_prefix("emfile "))
        .and_then(|v| v.trim().parse::<u64>().ok())
        .unwrap_or(0);
    if emfile == 0 {
        return Err("the child never hit EMFILE (accept pauses emfile=0)".into());
    }
    pass(format!(
        "{detail}; accept paused {emfile} time(s) on EMFILE, then served again"
    ))
}

fn drive_emfile_child(child: &mut std::process::Child) -> Result<(String, Vec<String>), String> {
    let out = child
        .stdout
        .take()
        .ok_or_else(|| "child stdout".to_string())?;
    let (tx, rx) = mpsc::channel::<String>();
    thread::spawn(move || {
        for line in BufReader::new(out).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let next = |what: &str| {
        rx.recv_timeout(IO_TIMEOUT)
            .map_err(|_| format!("the child did not report {what}"))
    };
    let port_line = next("its port")?;
    let addr: SocketAddr = port_line
        .strip_prefix("listening ")
        .and_then(|a| a.trim().parse().ok())
        .ok_or_else(|| format!("child: {port_line}"))?;
    let limit_line = next("its fd limit")?;
    // More clients than the child has fds for.
    let mut clients = Vec::new();
    for _ in 0..40 {
        if let Ok(mut c) = TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
            let _ = c.write_all(b"x");
            clients.push(c);
        }
    }
    // The child says when its accept hit the limit.
    let hit = next("hitting EMFILE")?;
    if hit != "emfile-hit" {
        return Err(format!("{limit_line}, {} clients: {hit}", clients.len()));
    }
    drop(clients);
    // Recovery: once the fds are back, a new client is served.
    let deadline = Instant::now() + Duration::from_secs(4);
    let recovered = loop {
        match roundtrip(addr, b"after the storm") {
            Ok(()) => break true,
            Err(_) if Instant::now() < deadline => thread::sleep(Duration::from_millis(50)),
            Err(_) => break false,
        }
    };
    if !recovered {
        return Err(format!(
            "{limit_line}: not serving again within 4 s after the fds came back"
        ));
    }
    if let Some(stdin) = child.stdin.take() {
        drop(stdin);
    }
    let mut lines = Vec::new();
    while let Ok(l) = rx.recv_timeout(IO_TIMEOUT) {
        lines.push(l);
    }
    Ok((limit_line, lines))
}

/// The child: run epoxy in front of `backend`, lower the fd limit to a few above what is
/// open, report, and wait for stdin to close; then print the EMFILE pauses.
pub fn emfile_child(backend: &str) -> u8 {
    let run = || -> Result<(), String> {
        let backend: SocketAddr = backend
            .parse()
            .map_err(|e| format!("backend {backend}: {e}"))?;
        let proxy = start_proxy(loopback4(), backend, 1, false)?;
        let addr = first_addr(&proxy)?;
        println!("listening {addr}");
        let open = std::fs::read_dir("/proc/self/fd").map_or(16, |d| d.count()) as u64;
        let limit = step("setrlimit", sys::set_nofile_soft_limit(open + 8))?;
        println!("fd limit {limit} with {open} open");
        let _ = io::stdout().flush();
        let emfile = |p: &Proxy| p.summary().accept_pauses[PauseCause::Emfile as usize];
        let deadline = Instant::now() + IO_TIMEOUT;
        while emfile(&proxy) == 0 && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(5));
        }
        if emfile(&proxy) > 0 {
            println!("emfile-hit");
        } else {
            println!("no EMFILE within {IO_TIMEOUT:?}");
        }
        let _ = io::stdout().flush();
        let mut sink = Vec::new();
        let _ = io::stdin().read_to_end(&mut sink);
        let s = proxy.summary();
        println!("emfile {}", s.accept_pauses[PauseCause::Emfile as usize]);
        println!("accepted {}", s.accepted);
        Ok(())
    };
    match run() {
        Ok(()) => 0,
        Err(e) => {
            println!("error {e}");
            1
        }
    }
}

/// Every check, in order.
pub fn run_all() -> Vec<Check> {
    let checks: [(&'static str, CheckFn); 10] = [
        ("half-close", check_half_close),
        ("reset", check_reset),
        ("slow-reader", check_slow_reader),
        ("emfile", check_emfile),
        ("splice", check_splice),
        ("reuseport", check_reuseport),
        ("ipv6", check_ipv6),
        ("fd-limit", check_fd_limit),
        ("cgroup-cpu", check_cgroup_cpu),
        ("cgroup-memory", check_cgroup_memory),
    ];
    checks
        .iter()
        .map(|(name, f)| {
            let t0 = Instant::now();
            let (outcome, detail) = f().unwrap_or_else(|e| (Outcome::Fail, e));
            Check {
                name,
                outcome,
                detail,
                elapsed: t0.elapsed(),
            }
        })
        .collect()
}

/// `proxy selftest`: run, print, exit status (0 all passed or skipped, 1 otherwise).
pub fn main(json_out: bool) -> u8 {
    let checks = run_all();
    let ok = checks.iter().all(|c| c.outcome != Outcome::Fail);
    if json_out {
        let list: Vec<_> = checks
            .iter()
            .map(|c| {
                json!({
                    "name": c.name,
                    "result": c.outcome.as_str(),
                    "detail": c.detail,
                    "seconds": (c.elapsed.as_secs_f64() * 1000.0).round() / 1000.0,
                })
            })
            .collect();
        println!(
            "{}",
            json!({"version": env!("CARGO_PKG_VERSION"), "passed": ok, "checks": list})
        );
    } else {
        println!(
            "epoxy {} selftest (loopback only)",
            env!("CARGO_PKG_VERSION")
        );
        println!("{:<14} {:<6} {:>7}  DETAIL", "CHECK", "RESULT", "TIME");
        for c in &checks {
            println!(
                "{:<14} {:<6} {:>5}ms  {}",
                c.name,
                c.outcome.as_str(),
                c.elapsed.as_millis(),
                c.detail
            );
        }
        let count = |o| checks.iter().filter(|c| c.outcome == o).count();
        println!(
            "{} checks: {} passed, {} failed, {} skipped",
            checks.len(),
            count(Outcome::Pass),
            count(Outcome::Fail),
            count(Outcome::Skip)
        );
    }
    u8::from(!ok)
}
