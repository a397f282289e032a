//! Zero-downtime binary upgrade (SIGUSR2), systemd notification and socket activation, run
//! as an operator would: the real binary, a connect loop and long echo streams across the
//! signal, the new process found through the admin endpoint (`pid` in the JSON) and the PID
//! file, exit statuses of every generation read by this process (a child subreaper: each
//! old process's orphans are re-parented here).

use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixDatagram;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Once};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::util::*;

/// Make this test process the reaper of its descendants' orphans, so the exit status of a
/// process started by an upgrade (a grandchild) can be read here once its parent is gone.
pub(crate) fn become_subreaper() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // SAFETY: prctl with integer arguments only; it changes a flag of this process.
        let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
        assert_eq!(rc, 0, "prctl(PR_SET_CHILD_SUBREAPER)");
    });
}

/// Wait up to `timeout` for `pid` (a child of this process, perhaps only once its parent
/// exits) to exit; its exit code, or 128 + the signal that killed it.
pub(crate) fn reap(pid: u32, timeout: Duration) -> Option<i32> {
    let deadline = Instant::now() + timeout;
    loop {
        let mut status: libc::c_int = 0;
        // SAFETY: `status` is a valid int for waitpid to fill; WNOHANG never blocks.
        let rc = unsafe { libc::waitpid(pid as libc::pid_t, &mut status, libc::WNOHANG) };
        if rc == pid as libc::pid_t {
            if libc::WIFEXITED(status) {
                return Some(libc::WEXITSTATUS(status));
            }
            if libc::WIFSIGNALED(status) {
                return Some(128 + libc::WTERMSIG(status));
            }
        }
        // rc 0: still running; -1 (ECHILD): not re-parented to us yet.
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}

/// The PIDs whose parent is `pid`.
pub(crate) fn children_of(pid: u32) -> Vec<u32> {
    let mut out = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for e in dir.flatten() {
        let Some(child) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{child}/stat")) else {
            continue;
        };
        // pid (comm) state ppid ...: comm may hold spaces, so split after the last ')'.
        let ppid = stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.split_whitespace().nth(1))
            .and_then(|p| p.parse::<u32>().ok());
        if ppid == Some(pid) {
            out.push(child);
        }
    }
    out
}

/// Processes started by upgrades: killed and reaped when the test ends, however it ends.
#[derive(Default)]
pub(crate) struct Generations(pub(crate) Vec<u32>);

impl Generations {
    /// SIGTERM the process that now serves, which must exit 0; nothing left to kill.
    pub(crate) fn stop(&mut self, pid: u32) {
        send_signal(pid, libc::SIGTERM).expect("SIGTERM");
        assert_eq!(
            reap(pid, scaled_secs(30)),
            Some(0),
            "PID {pid} after SIGTERM"
        );
        self.0.clear();
    }
}

impl Drop for Generations {
    fn drop(&mut self) {
        for &pid in &self.0 {
            let _ = send_signal(pid, libc::SIGKILL);
            let _ = reap(pid, Duration::from_secs(2));
        }
    }
}

/// The admin JSON document.
pub(crate) fn admin_json(admin: SocketAddr) -> Option<serde_json::Value> {
    let (code, body) = http_get(admin, "/metrics?format=json").ok()?;
    if code != 200 {
        return None;
    }
    serde_json::from_str(&body).ok()
}

/// The PID of the process that answers on the admin endpoint.
pub(crate) fn admin_pid(admin: SocketAddr) -> Option<u32> {
    admin_json(admin)?.get("pid")?.as_u64().map(|p| p as u32)
}

pub(crate) fn active_connections(admin: SocketAddr) -> u64 {
    admin_json(admin)
        .and_then(|j| j.get("active_connections")?.as_u64())
        .unwrap_or(0)
}

/// Send SIGUSR2 to `old` and wait for another process to answer on the admin endpoint.
pub(crate) fn upgrade(old: u32, admin: SocketAddr, log: &ProxyHandle) -> u32 {
    send_signal(old, libc::SIGUSR2).expect("SIGUSR2");
    let mut new = None;
    let ok = wait_until(scaled_secs(30), || {
        new = admin_pid(admin).filter(|&p| p != old);
        new.is_some()
    });
    assert!(
        ok,
        "no new process answered the admin endpoint after SIGUSR2; stderr:\n{}",
        log.stderr_text()
    );
    new.expect("new pid")
}

/// A client loop: a new connection every 5 ms, one echoed line each; every failure noted.
pub(crate) struct Churn {
    stop: Arc<AtomicBool>,
    ok: Arc<AtomicU64>,
    failures: Arc<Mutex<Vec<String>>>,
    thread: Option<JoinHandle<()>>,
}

impl Churn {
    pub(crate) fn start(addr: SocketAddr) -> Churn {
        let stop = Arc::new(AtomicBool::new(false));
        let ok = Arc::new(AtomicU64::new(0));
        let failures = Arc::new(Mutex::new(Vec::new()));
        let (s2, o2, f2) = (stop.clone(), ok.clone(), failures.clone());
        let thread = thread::spawn(move || {
            let mut n = 0u64;
            while !s2.load(Ordering::SeqCst) {
                n += 1;
                let msg = format!("ping {n:010}\n");
                let res = (|| -> std::io::Result<()> {
                    let mut s = TcpStream::connect_timeout(&addr, scaled_secs(5))?;
                    s.set_read_timeout(Some(scaled_secs(10)))?;
                    s.write_all(msg.as_bytes())?;
                    let mut back = vec![0u8; msg.len()];
                    s.read_exact(&mut back)?;
                    if back != msg.as_bytes() {
                        return Err(std::io::Error::other("echo differs"));
                    }
                    Ok(())
                })();
                match res {
                    Ok(()) => {
                        o2.fetch_add(1, Ordering::SeqCst);
                    }
                    Err(e) => f2
                        .lock()
                        .expect("lock")
                        .push(format!("connection {n}: {e}")),
                }
                thread::sleep(Duration::from_millis(5));
            }
        });
        Churn {
            stop,
            ok,
            failures,
            thread: Some(thread),
        }
    }

    pub(crate) fn ok(&self) -> u64 {
        self.ok.load(Ordering::SeqCst)
    }

    /// Stop; the number of good connections (asserts there was no failure).
    pub(crate) fn finish(mut self) -> u64 {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            t.join().expect("churn thread");
        }
        let f = self.failures.lock().expect("lock");
        assert!(
            f.is_empty(),
            "{} failed connection(s): {:?}",
            f.len(),
            &f[..f.len().min(10)]
        );
        self.ok()
    }
}

/// A long echo stream: `rounds` chunks of 4 KiB, each echoed and compared byte for byte,
/// `pause` apart, then a half-close and the end of the echo.
pub(crate) fn stream(
    addr: SocketAddr,
    seed: u64,
    rounds: usize,
    pause: Duration,
) -> JoinHandle<Result<(), String>> {
    thread::spawn(move || {
        let mut s = TcpStream::connect_timeout(&addr, scaled_secs(5))
            .map_err(|e| format!("connect: {e}"))?;
        s.set_read_timeout(Some(scaled_secs(20)))
            .map_err(|e| e.to_string())?;
        let mut back = vec![0u8; 4096];
        for i in 0..rounds {
            let chunk = Pattern::bytes(seed * 1000 + i as u64, 4096);
            s.write_all(&chunk)
                .map_err(|e| format!("stream {seed} chunk {i}: write: {e}"))?;
            s.read_exact(&mut back)
                .map_err(|e| format!("stream {seed} chunk {i}: read: {e}"))?;
            if back != chunk {
                return Err(format!("stream {seed} chunk {i}: echo differs"));
            }
            thread::sleep(pause);
        }
        s.shutdown(Shutdown::Write).map_err(|e| e.to_string())?;
        let mut rest = Vec::new();
        s.read_to_end(&mut rest)
            .map_err(|e| format!("stream {seed}: end: {e}"))?;
        if !rest.is_empty() {
            return Err(format!("stream {seed}: {} stray bytes", rest.len()));
        }
        Ok(())
    })
}

pub(crate) fn wait_active(admin: SocketAddr, n: u64) {
    assert!(
        wait_until(scaled_secs(20), || active_connections(admin) >= n),
        "fewer than {n} live connections"
    );
}

/// One app in front of `echo`, grace 60 s; `migrate`: move live pairs on upgrade (issue 11)
/// or let them drain in the old process (the behaviour these tests check).
pub(crate) fn config_with(echo: SocketAddr, migrate: bool, extra: &str) -> String {
    format!(
        "[defaults]\ngrace_period = \"60s\"\nupgrade_migrate = {migrate}\n\n[[app]]\nname = \"up\"\nlisten = [\"{}\"]\ntargets = [\"{echo}\"]\n{extra}",
        any_port(1)
    )
}

fn config(echo: SocketAddr) -> String {
    config_with(echo, false, "")
}

/// Five upgrades in a row under a connect loop and 20 long streams per upgrade: nothing
/// refused, reset or corrupted; a new PID owns the listener each time; each old process
/// exits 0 once its streams are done; totals carry over.
fn upgrade_under_load(extra: &[&str]) {
    let _heavy = heavy_lock();
    become_subreaper();
    let echo = echo_server();
    let st = start_cfg("toml", 1, extra, true, &config(echo.addr()));
    let addr = st.addr(0);
    let admin = st.admin.expect("admin");
    let mut first = st.proxy;
    let mut gens = Generations::default();
    let churn = Churn::start(addr);
    let mut old = first.pid();
    let mut streamed = 0u64;
    for round in 0..5u64 {
        let streams: Vec<_> = (0..20)
            .map(|i| stream(addr, round * 100 + i, 40, Duration::from_millis(25)))
            .collect();
        wait_active(admin, 20);
        let new = upgrade(old, admin, &first);
        gens.0.push(new);
        assert!(
            proc_listen_addrs(new).expect("listeners").contains(&addr),
            "PID {new} does not hold the listener {addr}"
        );
        for (i, s) in streams.into_iter().enumerate() {
            s.join()
                .expect("stream thread")
                .unwrap_or_else(|e| panic!("round {round} stream {i}: {e}"));
            streamed += 1;
        }
        if round == 0 {
            assert!(
                wait_until(scaled_secs(30), || first.has_exited()),
                "the first process did not exit after its streams ended; stderr:\n{}",
                first.stderr_text()
            );
            let st = first.status().expect("status");
            assert!(st.success(), "first process: {st:?}");
        } else {
            assert_eq!(reap(old, scaled_secs(30)), Some(0), "old PID {old}");
        }
        old = new;
    }
    let ok = churn.finish();
    assert!(ok > 50, "only {ok} connections in the loop");
    let text = metrics_text(admin);
    assert_eq!(
        metric(&text, "epoxy_upgrades_total", &[("result", "success")]),
        Some(5.0)
    );
    assert_eq!(
        metric(&text, "epoxy_upgrades_total", &[("result", "failure")]),
        Some(0.0)
    );
    // Totals carried over: every connection of every generation is counted in the last.
    let total: f64 = samples(&text, "epoxy_connections_total")
        .iter()
        .map(|(_, v)| v)
        .sum();
    assert!(
        total >= (ok + streamed) as f64,
        "epoxy_connections_total {total} < {} connections made",
        ok + streamed
    );
    gens.stop(old);
    let log = first.stderr_text();
    assert!(!log.contains("upgrade failed"), "{log}");
    assert_no_panic(&log);
}

#[test]
fn upgrade_under_load_five_times() {
    upgrade_under_load(&[]);
}

#[test]
fn upgrade_under_load_two_workers() {
    upgrade_under_load(&["--workers", "2"]);
}

/// An invalid config file: the new process fails, the old keeps serving, nothing stray is
/// left, the failure is counted; once fixed, the next SIGUSR2 upgrades.
#[test]
fn upgrade_with_invalid_config_keeps_serving() {
    become_subreaper();
    let echo = echo_server();
    let good = config(echo.addr());
    let pid_path = std::env::temp_dir().join(format!(
        "epoxy-upgrade-{}-{}.pid",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let pid_arg = pid_path.to_string_lossy().into_owned();
    let pid_in_file = || {
        std::fs::read_to_string(&pid_path)
            .ok()
            .and_then(|t| t.trim().parse::<u32>().ok())
    };
    let st = start_cfg("toml", 1, &["--pid-file", &pid_arg], true, &good);
    let addr = st.addr(0);
    let admin = st.admin.expect("admin");
    let mut first = st.proxy;
    let mut gens = Generations::default();
    let churn = Churn::start(addr);
    let old = first.pid();

    st.file.write("[[app]]\nname = \"up\"\nlisten = 12\n");
    let from = first.stderr_line_count();
    send_signal(old, libc::SIGUSR2).expect("SIGUSR2");
    assert!(
        first.wait_stderr_lines_matching(from, scaled_secs(30), |l| l.contains("upgrade failed")),
        "no failure logged; stderr:\n{}",
        first.stderr_text()
    );
    let line = first
        .stderr_lines_since(from)
        .into_iter()
        .find(|l| l.contains("upgrade failed"))
        .expect("line");
    assert!(
        line.contains("key 'listen'") && line.contains("still serving"),
        "{line}"
    );
    assert_eq!(
        pid_in_file(),
        Some(old),
        "the pid file must still name the old process"
    );
    assert!(
        children_of(old).is_empty(),
        "a stray process: {:?}",
        children_of(old)
    );
    assert_eq!(admin_pid(admin), Some(old));
    assert!(
        proc_listen_addrs(old).expect("listeners").contains(&addr),
        "the old process no longer holds {addr}"
    );
    let text = metrics_text(admin);
    assert_eq!(
        metric(&text, "epoxy_upgrades_total", &[("result", "failure")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "epoxy_upgrades_total", &[("result", "success")]),
        Some(0.0)
    );
    let before = churn.ok();
    assert!(
        wait_until(scaled_secs(10), || churn.ok() > before + 5),
        "the old process stopped serving"
    );

    st.file.write(&good);
    let new = upgrade(old, admin, &first);
    gens.0.push(new);
    assert!(
        wait_until(scaled_secs(30), || first.has_exited()),
        "old did not exit"
    );
    assert!(
        first.status().is_some_and(|s| s.success()),
        "{:?}",
        first.status()
    );
    // Rewritten by the new process; the old one left it alone at exit.
    assert_eq!(pid_in_file(), Some(new));
    let text = metrics_text(admin);
    assert_eq!(
        metric(&text, "epoxy_upgrades_total", &[("result", "success")]),
        Some(1.0)
    );
    assert_eq!(
        metric(&text, "epoxy_upgrades_total", &[("result", "failure")]),
        Some(1.0)
    );
    churn.finish();
    gens.stop(new);
    assert_eq!(pid_in_file(), None, "the pid file is removed at exit");
}

/// `kill -9` of the new process before it is ready: the old one keeps every connection and
/// keeps accepting; the failure is counted.
#[test]
fn new_process_killed_before_ready_loses_nothing() {
    become_subreaper();
    let echo = echo_server();
    let st = start_cfg_env(
        "toml",
        1,
        &[],
        true,
        &config(echo.addr()),
        &[("EPOXY_UPGRADE_TEST_HOLD_MS", "60000")],
    );
    let addr = st.addr(0);
    let admin = st.admin.expect("admin");
    let first = st.proxy;
    let churn = Churn::start(addr);
    let streams: Vec<_> = (0..5)
        .map(|i| stream(addr, 900 + i, 60, Duration::from_millis(20)))
        .collect();
    let old = first.pid();
    let from = first.stderr_line_count();
    send_signal(old, libc::SIGUSR2).expect("SIGUSR2");
    // The new process has the sockets and holds before saying ready.
    assert!(
        first
            .wait_stderr_lines_matching(from, scaled_secs(30), |l| l.contains("upgrade: received")),
        "the new process did not receive the sockets; stderr:\n{}",
        first.stderr_text()
    );
    let kids = children_of(old);
    assert_eq!(kids.len(), 1, "{kids:?}");
    send_signal(kids[0], libc::SIGKILL).expect("SIGKILL");
    assert!(
        first.wait_stderr_lines_matching(from, scaled_secs(30), |l| l.contains("upgrade failed")),
        "no failure logged; stderr:\n{}",
        first.stderr_text()
    );
    assert!(children_of(old).is_empty());
    for s in streams {
        s.join().expect("stream thread").expect("stream intact");
    }
    let before = churn.ok();
    assert!(
        wait_until(scaled_secs(10), || churn.ok() > before + 5),
        "the old process stopped serving"
    );
    churn.finish();
    assert_eq!(admin_pid(admin), Some(old));
    let text = metrics_text(admin);
    assert_eq!(
        metric(&text, "epoxy_upgrades_total", &[("result", "failure")]),
        Some(1.0)
    );
    exit_cleanly(first);
}

/// With `NOTIFY_SOCKET`: READY=1 at start; the new process sends MAINPID= and READY=1; the
/// old one does not say STOPPING; SIGTERM makes the new one say STOPPING=1.
#[test]
fn systemd_notifications_follow_the_upgrade() {
    become_subreaper();
    let echo = echo_server();
    let dir = std::env::temp_dir().join(format!(
        "epoxy-notify-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&dir).expect("dir");
    let path = dir.join("notify");
    let ds = UnixDatagram::bind(&path).expect("bind notify socket");
    ds.set_read_timeout(Some(scaled_secs(30))).expect("timeout");
    let recv = || {
        let mut buf = [0u8; 4096];
        let n = ds.recv(&mut buf).expect("a notification");
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    let path_s = path.to_string_lossy().into_owned();
    let st = start_cfg_env(
        "toml",
        1,
        &[],
        true,
        &config(echo.addr()),
        &[("NOTIFY_SOCKET", &path_s)],
    );
    let admin = st.admin.expect("admin");
    let mut first = st.proxy;
    let mut gens = Generations::default();
    assert_eq!(recv(), "READY=1\n");
    let new = upgrade(first.pid(), admin, &first);
    gens.0.push(new);
    assert_eq!(recv(), format!("MAINPID={new}\nREADY=1\n"));
    assert!(
        wait_until(scaled_secs(30), || first.has_exited()),
        "old did not exit"
    );
    assert!(first.status().is_some_and(|s| s.success()));
    ds.set_nonblocking(true).expect("nonblocking");
    let mut buf = [0u8; 4096];
    if let Ok(n) = ds.recv(&mut buf) {
        panic!(
            "unexpected notification: {:?}",
            String::from_utf8_lossy(&buf[..n])
        );
    }
    ds.set_nonblocking(false).expect("blocking");
    send_signal(new, libc::SIGTERM).expect("SIGTERM");
    assert_eq!(recv(), "STOPPING=1\n");
    assert_eq!(reap(new, scaled_secs(30)), Some(0));
    gens.0.clear();
    let _ = std::fs::remove_dir_all(&dir);
}

/// systemd socket activation: the listener comes as descriptor 3 with LISTEN_FDS=1 and
/// LISTEN_PID; the proxy serves on it (with two workers sharing it) and never binds (the
/// test holds the port, so a bind would fail).
#[test]
fn socket_activation_serves_the_given_listener() {
    let echo = echo_server();
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    socket2::SockRef::from(&l)
        .set_cloexec(false)
        .expect("inheritable");
    let addr = l.local_addr().expect("addr");
    let fd = l.as_raw_fd();
    let file = TempFile::new(
        "toml",
        &format!(
            "[[app]]\nname = \"act\"\nlisten = [\"{addr}\"]\ntargets = [\"{}\"]\n",
            echo.addr()
        ),
    );
    let redirect = if fd == 3 {
        String::new()
    } else {
        format!("3<&{fd} {fd}<&-")
    };
    // bash, not sh: dash takes only one-digit descriptors in a redirection, and with other
    // tests running in parallel the listener's descriptor is often 10 or more.
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!(
            "export LISTEN_PID=$$ LISTEN_FDS=1; exec \"$0\" -c \"$1\" --workers 2 {redirect}"
        ))
        .arg(PROXY_BIN)
        .arg(file.path());
    let p = spawn_proxy_cmd(cmd);
    // Inheritable only as long as needed: children other tests spawn meanwhile get a copy.
    socket2::SockRef::from(&l)
        .set_cloexec(true)
        .expect("not inheritable");
    assert!(
        p.wait_stderr_contains("socket activation: 1 listening socket(s)", scaled_secs(10)),
        "{}",
        p.stderr_text()
    );
    for i in 0..20 {
        let mut s = connect(addr);
        assert_echo(&mut s, format!("activated {i}").as_bytes());
    }
    drop(l);
    exit_cleanly(p);
}
