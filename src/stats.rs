//! Per-worker counters and the shutdown summary. Each `WorkerStats` has exactly one writer
//! (its worker thread), which updates with a plain relaxed load + store (no locked
//! read-modify-write on the relay path); readers (admin, summary) sum over workers. The
//! process-wide active/peak gauges used for admission live in `Shared`.

use std::fmt;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use crate::worker::pair::{CloseReason, ConnectFail};

/// A single-writer counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Add `n`. Only the owning worker calls this.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// Why accepting was paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseCause {
    /// Global or per-app `max_conns` reached.
    Limit,
    /// The process or system ran out of file descriptors (EMFILE/ENFILE).
    Emfile,
}

impl PauseCause {
    pub const COUNT: usize = 2;
    pub const ALL: [PauseCause; 2] = [PauseCause::Limit, PauseCause::Emfile];
    pub fn as_str(self) -> &'static str {
        match self {
            PauseCause::Limit => "limit",
            PauseCause::Emfile => "emfile",
        }
    }
}

/// Counters of one worker.
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub accepted: Counter,
    /// Live pairs on this worker (gauge: the writer adds and subtracts via `set_active`).
    pub active: Counter,
    pub bytes_up: Counter,
    pub bytes_down: Counter,
    pub connect_fail: [Counter; ConnectFail::COUNT],
    pub accept_pauses: [Counter; PauseCause::COUNT],
    pub closed: [Counter; CloseReason::COUNT],
    /// Access-log records dropped because the log writer fell behind.
    pub access_log_dropped: Counter,
}

impl WorkerStats {
    #[inline]
    pub fn set_active(&self, n: usize) {
        self.active.0.store(n as u64, Relaxed);
    }
}

/// Process-wide gauges shared by all workers (touched on accept/close only).
#[derive(Debug, Default)]
pub struct Shared {
    pub active: AtomicUsize,
    pub peak: AtomicUsize,
}

impl Shared {
    /// Count a new pair; returns the new total.
    pub fn open(&self) -> usize {
        let n = self.active.fetch_add(1, Relaxed) + 1;
        self.peak.fetch_max(n, Relaxed);
        n
    }
    pub fn close(&self) {
        self.active.fetch_sub(1, Relaxed);
    }
    pub fn active(&self) -> usize {
        self.active.load(Relaxed)
    }
}

/// Totals over all workers, printed at shutdown.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Summary {
    pub uptime: Duration,
    pub accepted: u64,
    pub peak_concurrent: u64,
    pub active: u64,
    pub bytes_client_to_upstream: u64,
    pub bytes_upstream_to_client: u64,
    pub connect_fail: [u64; ConnectFail::COUNT],
    pub accept_pauses: [u64; PauseCause::COUNT],
    pub closed: [u64; CloseReason::COUNT],
}

impl Summary {
    pub fn collect<'a>(
        workers: impl IntoIterator<Item = &'a WorkerStats>,
        shared: &Shared,
        uptime: Duration,
    ) -> Summary {
        let mut s = Summary {
            uptime,
            peak_concurrent: shared.peak.load(Relaxed) as u64,
            ..Summary::default()
        };
        for w in workers {
            s.accepted += w.accepted.get();
            s.active += w.active.get();
            s.bytes_client_to_upstream += w.bytes_up.get();
            s.bytes_upstream_to_client += w.bytes_down.get();
            add_all(&mut s.connect_fail, &w.connect_fail);
            add_all(&mut s.accept_pauses, &w.accept_pauses);
            add_all(&mut s.closed, &w.closed);
        }
        s
    }

    pub fn closed_total(&self) -> u64 {
        self.closed.iter().sum()
    }
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "epoxy summary:")?;
        writeln!(f, "  uptime: {:.3}s", self.uptime.as_secs_f64())?;
        writeln!(f, "  accepted: {}", self.accepted)?;
        writeln!(f, "  peak_concurrent: {}", self.peak_concurrent)?;
        writeln!(f, "  active: {}", self.active)?;
        writeln!(
            f,
            "  bytes_client_to_upstream: {}",
            self.bytes_client_to_upstream
        )?;
        writeln!(
            f,
            "  bytes_upstream_to_client: {}",
            self.bytes_upstream_to_client
        )?;
        breakdown(
            f,
            "connect_failures",
            &ConnectFail::ALL.map(|r| r.as_str()),
            &self.connect_fail,
        )?;
        breakdown(
            f,
            "accept_pauses",
            &PauseCause::ALL.map(|c| c.as_str()),
            &self.accept_pauses,
        )?;
        breakdown(
            f,
            "closed",
            &CloseReason::ALL.map(|r| r.as_str()),
            &self.closed,
        )
    }
}

fn add_all(totals: &mut [u64], counters: &[Counter]) {
    for (t, c) in totals.iter_mut().zip(counters) {
        *t += c.get();
    }
}

/// One summary line: `  name: total (a=1 b=2 ...)`.
fn breakdown(
    f: &mut fmt::Formatter<'_>,
    name: &str,
    labels: &[&str],
    values: &[u64],
) -> fmt::Result {
    write!(f, "  {name}: {} (", values.iter().sum::<u64>())?;
    for (i, (l, v)) in labels.iter().zip(values).enumerate() {
        let sep = if i == 0 { "" } else { " " };
        write!(f, "{sep}{l}={v}")?;
    }
    writeln!(f, ")")
}
