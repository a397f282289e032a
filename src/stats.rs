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
            for (t, c) in s.connect_fail.iter_mut().zip(&w.connect_fail) {
                *t += c.get();
            }
            for (t, c) in s.accept_pauses.iter_mut().zip(&w.accept_pauses) {
                *t += c.get();
            }
            for (t, c) in s.closed.iter_mut().zip(&w.closed) {
                *t += c.get();
            }
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
        write!(
            f,
            "  connect_failures: {} (",
            self.connect_fail.iter().sum::<u64>()
        )?;
        for (i, r) in ConnectFail::ALL.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{}={}", r.as_str(), self.connect_fail[i])?;
        }
        writeln!(f, ")")?;
        write!(
            f,
            "  accept_pauses: {} (",
            self.accept_pauses.iter().sum::<u64>()
        )?;
        for (i, r) in PauseCause::ALL.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{}={}", r.as_str(), self.accept_pauses[i])?;
        }
        writeln!(f, ")")?;
        write!(f, "  closed: {} (", self.closed_total())?;
        for (i, r) in CloseReason::ALL.iter().enumerate() {
            let sep = if i == 0 { "" } else { " " };
            write!(f, "{sep}{}={}", r.as_str(), self.closed[i])?;
        }
        writeln!(f, ")")
    }
}
