//! Target health: the shared up/down state of every target and the active-check thread.
//!
//! [`TargetHealth`] is a handful of atomics read by worker threads on every new connection
//! (one relaxed load in [`TargetHealth::is_up`]) and written rarely: by workers on connect
//! results (passive checks) and by the probe thread (active checks, rise/fall hysteresis).
//! [`spawn_checker`] runs the one probe thread: non-blocking TCP connects with a timeout, all
//! targets in flight at once, each state change logged once. Nothing here touches a worker's
//! sockets or event loop, and no lock is ever taken on the connection path.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use mio::net::TcpStream;
use mio::{Events, Interest, Poll, Token};

use crate::config::{ActiveHealth, HealthConfig};

/// `down_until` value meaning "down until active probes bring it back".
const UNTIL_PROBES: u64 = u64::MAX;
/// Longest sleep of the probe thread between looks at its stop flag.
const STEP: Duration = Duration::from_millis(50);

static EPOCH: OnceLock<Instant> = OnceLock::new();

/// Monotonic milliseconds since a process-wide epoch (the first call). Never `u64::MAX`.
pub fn now_ms() -> u64 {
    let epoch = EPOCH.get_or_init(Instant::now);
    u64::try_from(epoch.elapsed().as_millis())
        .unwrap_or(u64::MAX - 1)
        .min(u64::MAX - 1)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX - 1)
}

fn bump(counter: &AtomicU32) -> u32 {
    match counter.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
        Some(n.saturating_add(1))
    }) {
        Ok(prev) | Err(prev) => prev.saturating_add(1),
    }
}

/// Health of one target, shared by every worker and the probe thread.
#[derive(Debug)]
pub struct TargetHealth {
    /// `0` = up; [`UNTIL_PROBES`] = down until `rise` good probes; otherwise the
    /// [`now_ms`] instant at which a passively-downed target is tried again. The target is up
    /// exactly when `now_ms() >= down_until`.
    down_until: AtomicU64,
    /// Consecutive failed connects (passive); reset by a successful connect or a recovery.
    fails: AtomicU32,
    /// Consecutive good probes; reset by a failed probe or a passive mark-down.
    probe_ok: AtomicU32,
    /// Consecutive failed probes; reset by a good probe.
    probe_fail: AtomicU32,
    /// [`now_ms`] of the last mark-down or recovery (0: none since start). For display only.
    changed_ms: AtomicU64,
    /// The last active probe's result ([`ProbeResult`] as `u8`; 0: no probe yet).
    last_probe: AtomicU8,
    /// [`now_ms`] of the last active probe's result.
    last_probe_ms: AtomicU64,
}

/// The result of one active probe, as the stats page shows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeResult {
    Ok = 1,
    Refused = 2,
    Timeout = 3,
    Error = 4,
}

impl ProbeResult {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeResult::Ok => "ok",
            ProbeResult::Refused => "refused",
            ProbeResult::Timeout => "timeout",
            ProbeResult::Error => "error",
        }
    }

    /// Classify a probe's outcome.
    pub fn of(result: &io::Result<()>) -> ProbeResult {
        match result {
            Ok(()) => ProbeResult::Ok,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => ProbeResult::Refused,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => ProbeResult::Timeout,
            Err(_) => ProbeResult::Error,
        }
    }

    fn from_u8(v: u8) -> Option<ProbeResult> {
        match v {
            1 => Some(ProbeResult::Ok),
            2 => Some(ProbeResult::Refused),
            3 => Some(ProbeResult::Timeout),
            4 => Some(ProbeResult::Error),
            _ => None,
        }
    }
}

impl Default for TargetHealth {
    fn default() -> Self {
        Self::new()
    }
}

impl TargetHealth {
    /// A target that starts up.
    pub fn new() -> TargetHealth {
        TargetHealth {
            down_until: AtomicU64::new(0),
            fails: AtomicU32::new(0),
            probe_ok: AtomicU32::new(0),
            probe_fail: AtomicU32::new(0),
            changed_ms: AtomicU64::new(0),
            last_probe: AtomicU8::new(0),
            last_probe_ms: AtomicU64::new(0),
        }
    }

    /// The [`now_ms`] instant at which the current state (as [`TargetHealth::is_up`] says
    /// at `now_ms`) began: 0 when it has held since the start.
    pub fn since_ms(&self, now_ms: u64) -> u64 {
        let changed = self.changed_ms.load(Ordering::Relaxed);
        let until = self.down_until.load(Ordering::Relaxed);
        // A passive mark-down that expired: up again since its deadline.
        if until != 0 && until != UNTIL_PROBES && now_ms >= until {
            return changed.max(until);
        }
        changed
    }

    /// Remember an active probe's result (for display).
    pub fn note_probe(&self, result: ProbeResult, now_ms: u64) {
        self.last_probe.store(result as u8, Ordering::Relaxed);
        self.last_probe_ms.store(now_ms, Ordering::Relaxed);
    }

    /// The last active probe's result and its [`now_ms`] instant, if any probe ran.
    pub fn last_probe(&self) -> Option<(ProbeResult, u64)> {
        ProbeResult::from_u8(self.last_probe.load(Ordering::Relaxed))
            .map(|r| (r, self.last_probe_ms.load(Ordering::Relaxed)))
    }

    /// False while marked down (a passive mark-down expires at its deadline when there are no
    /// active checks).
    pub fn is_up(&self, now_ms: u64) -> bool {
        now_ms >= self.down_until.load(Ordering::Relaxed)
    }

    /// A connect to this target succeeded: resets the passive failure streak.
    pub fn on_connect_ok(&self) {
        if self.fails.load(Ordering::Relaxed) != 0 {
            self.fails.store(0, Ordering::Relaxed);
        }
    }

    /// Passive failure (connect refused or timed out). Returns true if this call marked the
    /// target down (the streak reached `fall`); only one of several racing callers gets true.
    /// Without active checks the mark lasts `down_time`; after it expires, the streak is still
    /// at `fall`, so the next failure marks it down again at once (half-open), while a success
    /// resets it. With active checks it stays down until probes bring it back.
    pub fn on_connect_fail(&self, now_ms: u64, cfg: &HealthConfig) -> bool {
        let streak = bump(&self.fails);
        if streak < cfg.fall.max(1) {
            return false;
        }
        let current = self.down_until.load(Ordering::Relaxed);
        if now_ms < current {
            return false; // already down
        }
        let until = match cfg.active {
            Some(_) => UNTIL_PROBES,
            None => now_ms
                .saturating_add(millis(cfg.down_time))
                .min(u64::MAX - 1),
        };
        if until <= now_ms {
            return false; // down_time of zero: never skipped
        }
        let marked = self
            .down_until
            .compare_exchange(current, until, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        if marked {
            self.probe_ok.store(0, Ordering::Relaxed);
            self.changed_ms.store(now_ms, Ordering::Relaxed);
        }
        marked
    }

    /// Active probe result. Returns `Some(new_up)` when the state changed: down after `fall`
    /// failed probes in a row, up after `rise` good ones in a row.
    pub fn on_probe(&self, ok: bool, cfg: &ActiveHealth) -> Option<bool> {
        if ok {
            self.probe_fail.store(0, Ordering::Relaxed);
            let streak = bump(&self.probe_ok);
            let current = self.down_until.load(Ordering::Relaxed);
            if current != 0 && streak >= cfg.rise.max(1) {
                let changed = self
                    .down_until
                    .compare_exchange(current, 0, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok();
                if changed {
                    self.fails.store(0, Ordering::Relaxed);
                    self.changed_ms.store(now_ms(), Ordering::Relaxed);
                    return Some(true);
                }
            }
        } else {
            self.probe_ok.store(0, Ordering::Relaxed);
            let streak = bump(&self.probe_fail);
            let current = self.down_until.load(Ordering::Relaxed);
            if current != UNTIL_PROBES && streak >= cfg.fall.max(1) {
                let changed = self
                    .down_until
                    .compare_exchange(current, UNTIL_PROBES, Ordering::AcqRel, Ordering::Relaxed)
                    .is_ok();
                let now = now_ms();
                if changed && now >= current {
                    // It was up (never marked, or a passive mark that had expired).
                    self.changed_ms.store(now, Ordering::Relaxed);
                }
                if changed && current == 0 {
                    return Some(false);
                }
            }
        }
        None
    }
}

/// One target to probe.
#[derive(Debug, Clone)]
pub struct HealthTarget {
    pub app: String,
    /// The target as the operator wrote it (for logs).
    pub target: String,
    pub addr: SocketAddr,
    pub state: Arc<TargetHealth>,
    pub check: ActiveHealth,
}

/// One probe in flight or waiting for its turn.
struct Probe {
    /// The connect in progress, registered with the probe thread's poll under the target's
    /// index; `None` between probes.
    stream: Option<TcpStream>,
    /// When the connect in progress fails by timeout.
    deadline: Instant,
    /// When the next probe starts.
    next_due: Instant,
}

/// Start the probe thread for every target with active checks: every `interval`, a TCP
/// connect with `timeout` to each target updates its state; each change is logged once
/// ("app 'web' target 127.0.0.1:8082 is DOWN (3 failed probes: ...)" / "is UP"). The thread
/// returns within about 50 ms of `stop` being set.
pub fn spawn_checker(
    targets: Vec<HealthTarget>,
    stop: Arc<AtomicBool>,
) -> io::Result<JoinHandle<()>> {
    let poll = Poll::new()?;
    std::thread::Builder::new()
        .name("health".into())
        .spawn(move || run_checker(poll, &targets, &stop))
}

fn run_checker(mut poll: Poll, targets: &[HealthTarget], stop: &AtomicBool) {
    let mut events = Events::with_capacity(targets.len().clamp(16, 1024));
    let start = Instant::now();
    let mut probes: Vec<Probe> = targets
        .iter()
        .map(|_| Probe {
            stream: None,
            deadline: start,
            next_due: start,
        })
        .collect();
    while !stop.load(Ordering::Acquire) {
        let now = Instant::now();
        for (i, (t, p)) in targets.iter().zip(probes.iter_mut()).enumerate() {
            if p.stream.is_some() || now < p.next_due {
                continue;
            }
            p.next_due = now + t.check.interval;
            p.deadline = now + t.check.timeout;
            match TcpStream::connect(t.addr) {
                Ok(mut s) => match poll
                    .registry()
                    .register(&mut s, Token(i), Interest::WRITABLE)
                {
                    Ok(()) => p.stream = Some(s),
                    Err(e) => report(t, Err(e)),
                },
                Err(e) => report(t, Err(e)),
            }
        }

        let mut wait = STEP;
        for p in &probes {
            let at = if p.stream.is_some() {
                p.deadline
            } else {
                p.next_due
            };
            wait = wait.min(at.saturating_duration_since(now));
        }
        if let Err(e) = poll.poll(&mut events, Some(wait)) {
            if e.kind() != io::ErrorKind::Interrupted {
                log::error!("health checks: poll failed: {e}");
                std::thread::sleep(STEP);
            }
            continue;
        }
        for ev in events.iter() {
            let i = ev.token().0;
            let (Some(t), Some(p)) = (targets.get(i), probes.get_mut(i)) else {
                continue;
            };
            let Some(s) = p.stream.as_ref() else {
                continue;
            };
            let result = match s.take_error() {
                Ok(Some(e)) | Err(e) => Err(e),
                Ok(None) => match s.peer_addr() {
                    Ok(_) => Ok(()),
                    Err(e) if e.kind() == io::ErrorKind::NotConnected => continue,
                    Err(e) => Err(e),
                },
            };
            finish(&poll, p);
            report(t, result);
        }
        let now = Instant::now();
        for (t, p) in targets.iter().zip(probes.iter_mut()) {
            if p.stream.is_some() && now >= p.deadline {
                finish(&poll, p);
                report(
                    t,
                    Err(io::Error::new(io::ErrorKind::TimedOut, "connect timed out")),
                );
            }
        }
    }
    for p in &mut probes {
        finish(&poll, p);
    }
}

/// End the probe in flight (if any): deregister and close its socket.
fn finish(poll: &Poll, p: &mut Probe) {
    if let Some(mut s) = p.stream.take() {
        // The socket is closed right after; a failed deregister changes nothing.
        let _ = poll.registry().deregister(&mut s);
    }
}

/// Apply one probe result and log a state change, once.
fn report(t: &HealthTarget, result: io::Result<()>) {
    t.state.note_probe(ProbeResult::of(&result), now_ms());
    match t.state.on_probe(result.is_ok(), &t.check) {
        Some(false) => {
            let why = result.err().map(|e| e.to_string()).unwrap_or_default();
            log::warn!(
                "app '{}' target {} is DOWN ({} failed probes: {why})",
                t.app,
                t.target,
                t.check.fall
            );
        }
        Some(true) => log::info!(
            "app '{}' target {} is UP ({} good probes)",
            t.app,
            t.target,
            t.check.rise
        ),
        None => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;

    fn passive(fall: u32, down_ms: u64) -> HealthConfig {
        HealthConfig {
            fall,
            down_time: Duration::from_millis(down_ms),
            active: None,
        }
    }

    fn active(rise: u32, fall: u32) -> ActiveHealth {
        ActiveHealth {
            interval: Duration::from_millis(20),
            timeout: Duration::from_millis(200),
            rise,
            fall,
        }
    }

    #[test]
    fn passive_fall_marks_down_and_expires() {
        let h = TargetHealth::new();
        let cfg = passive(3, 10_000);
        assert!(h.is_up(0));
        assert!(!h.on_connect_fail(100, &cfg));
        assert!(!h.on_connect_fail(100, &cfg));
        h.on_connect_ok(); // streak broken
        assert!(!h.on_connect_fail(200, &cfg));
        assert!(!h.on_connect_fail(200, &cfg));
        assert!(h.is_up(200));
        assert!(
            h.on_connect_fail(300, &cfg),
            "third failure in a row marks down"
        );
        assert!(!h.is_up(300));
        assert!(
            !h.on_connect_fail(301, &cfg),
            "already down: not marked again"
        );
        assert!(!h.is_up(10_299));
        assert!(h.is_up(10_300), "down_time over");
        // Half-open: the streak is still at `fall`, so one more failure marks it down again.
        assert!(h.on_connect_fail(10_400, &cfg));
        assert!(!h.is_up(10_401));
        // A success after expiry resets the streak: it takes `fall` failures again.
        assert!(h.is_up(20_400));
        h.on_connect_ok();
        assert!(!h.on_connect_fail(20_500, &cfg));
        assert!(h.is_up(20_500));
    }

    #[test]
    fn passive_with_zero_down_time_never_skips() {
        let h = TargetHealth::new();
        let cfg = passive(1, 0);
        assert!(!h.on_connect_fail(5, &cfg));
        assert!(h.is_up(5));
    }

    #[test]
    fn passive_with_active_checks_waits_for_probes() {
        let h = TargetHealth::new();
        let a = active(2, 3);
        let cfg = HealthConfig {
            fall: 2,
            down_time: Duration::from_millis(10),
            active: Some(a),
        };
        assert_eq!(h.on_probe(true, &a), None);
        assert_eq!(h.on_probe(true, &a), None, "already up");
        assert!(!h.on_connect_fail(1, &cfg));
        assert!(h.on_connect_fail(1, &cfg));
        assert!(!h.is_up(1_000_000), "no expiry with active checks");
        // The good probes before the mark-down do not count: `rise` fresh ones are needed.
        assert_eq!(h.on_probe(true, &a), None);
        assert!(!h.is_up(1_000_000));
        assert_eq!(h.on_probe(true, &a), Some(true));
        assert!(h.is_up(1_000_000));
        // Recovery resets the passive streak too.
        assert!(!h.on_connect_fail(2, &cfg));
    }

    #[test]
    fn active_rise_fall_hysteresis() {
        let h = TargetHealth::new();
        let a = active(2, 3);
        assert_eq!(h.on_probe(false, &a), None);
        assert_eq!(h.on_probe(false, &a), None);
        assert_eq!(
            h.on_probe(true, &a),
            None,
            "a good probe breaks the fail streak"
        );
        assert_eq!(h.on_probe(false, &a), None);
        assert_eq!(h.on_probe(false, &a), None);
        assert!(h.is_up(0));
        assert_eq!(h.on_probe(false, &a), Some(false));
        assert!(!h.is_up(u64::MAX - 1));
        assert_eq!(h.on_probe(false, &a), None, "changes are reported once");
        assert_eq!(h.on_probe(true, &a), None);
        assert_eq!(
            h.on_probe(false, &a),
            None,
            "a failed probe breaks the rise streak"
        );
        assert_eq!(h.on_probe(true, &a), None);
        assert!(!h.is_up(0));
        assert_eq!(h.on_probe(true, &a), Some(true));
        assert!(h.is_up(0));
        assert_eq!(h.on_probe(true, &a), None);
    }

    #[test]
    fn racing_failures_mark_down_once() {
        let h = Arc::new(TargetHealth::new());
        let cfg = passive(3, 60_000);
        let barrier = Arc::new(std::sync::Barrier::new(8));
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (h, barrier) = (Arc::clone(&h), Arc::clone(&barrier));
                std::thread::spawn(move || {
                    barrier.wait();
                    (0..1000).filter(|_| h.on_connect_fail(50, &cfg)).count()
                })
            })
            .collect();
        let marks: usize = handles.into_iter().map(|t| t.join().unwrap_or(0)).sum();
        assert_eq!(marks, 1);
        assert!(!h.is_up(100));
    }

    #[test]
    fn now_ms_is_monotonic() {
        let a = now_ms();
        let b = now_ms();
        assert!(b >= a);
        assert!(b < u64::MAX);
    }

    /// Poll `f` until it is true or `limit` passes.
    fn wait_for(limit: Duration, mut f: impl FnMut() -> bool) -> bool {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if f() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        f()
    }

    #[test]
    fn probes_follow_a_real_listener() {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let addr = listener.local_addr().unwrap();
        let state = Arc::new(TargetHealth::new());
        let stop = Arc::new(AtomicBool::new(false));
        let target = HealthTarget {
            app: "web".into(),
            target: addr.to_string(),
            addr,
            state: Arc::clone(&state),
            check: active(2, 2),
        };
        let handle = spawn_checker(vec![target], Arc::clone(&stop)).unwrap();

        // Probes arrive and the target stays up.
        let mut accepted = 0;
        assert!(wait_for(Duration::from_secs(5), || {
            while listener.accept().is_ok() {
                accepted += 1;
            }
            accepted >= 3
        }));
        assert!(state.is_up(now_ms()));

        // The listener goes away: down after `fall` failed probes.
        drop(listener);
        assert!(wait_for(Duration::from_secs(5), || !state.is_up(now_ms())));

        // It comes back: up after `rise` good probes.
        let listener = TcpListener::bind(addr).unwrap();
        assert!(wait_for(Duration::from_secs(5), || state.is_up(now_ms())));
        drop(listener);

        let t0 = Instant::now();
        stop.store(true, Ordering::Release);
        handle.join().unwrap();
        assert!(
            t0.elapsed() < Duration::from_millis(500),
            "{:?}",
            t0.elapsed()
        );
    }

    #[test]
    fn probe_timeout_counts_as_failure() {
        // A non-routable address (TEST-NET-1): the connect never completes on its own.
        let state = Arc::new(TargetHealth::new());
        let stop = Arc::new(AtomicBool::new(false));
        let mut check = active(1, 1);
        check.timeout = Duration::from_millis(50);
        let target = HealthTarget {
            app: "t".into(),
            target: "192.0.2.1:9".into(),
            addr: "192.0.2.1:9".parse().unwrap(),
            state: Arc::clone(&state),
            check,
        };
        let handle = spawn_checker(vec![target], Arc::clone(&stop)).unwrap();
        assert!(wait_for(Duration::from_secs(5), || !state.is_up(now_ms())));
        let t0 = Instant::now();
        stop.store(true, Ordering::Release);
        handle.join().unwrap();
        assert!(t0.elapsed() < Duration::from_millis(500));
    }
}
