//! Every counter and gauge of the proxy, and the calls that write them.
//!
//! Writers: a worker changes counters only through its [`Recorder`] (`record_accept`,
//! `record_connect_fail`, `record_close`, ...), so one close is counted in one place. Per-worker
//! cells ([`WorkerStats`], and each app's [`BytesCell`] for that worker) have exactly one writer
//! and are updated with a relaxed load + store (no locked read-modify-write on the relay path);
//! app and target counters are shared atomics written on accept, connect and close only.
//! Readers (admin, summary, periodic line) sum over workers. Counter arrays are indexed by the
//! enums of `outcome.rs`. This module never touches sockets or the clock.

use std::fmt;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::time::Duration;

use crate::outcome::{CloseReason, ConnectFail, PauseCause};

/// A single-writer counter.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    /// Add `n`. Only the owning worker calls this.
    #[inline]
    pub fn add(&self, n: u64) {
        self.0.store(self.0.load(Relaxed).wrapping_add(n), Relaxed);
    }
    /// Overwrite (a gauge with one writer).
    #[inline]
    pub fn set(&self, n: u64) {
        self.0.store(n, Relaxed);
    }
    #[inline]
    pub fn get(&self) -> u64 {
        self.0.load(Relaxed)
    }
}

/// A shared count of live pairs with an optional limit, and its peak. A slot is taken
/// *before* a client is accepted ([`Slots::try_take`]), so the limit is exact across workers:
/// `get() <= limit` always holds. The peak is noted when a slot is really used
/// ([`Slots::note_peak`]), so reservations that found no client do not inflate it.
#[derive(Debug, Default)]
pub struct Slots {
    live: AtomicUsize,
    peak: AtomicUsize,
}

impl Slots {
    /// Take one slot unless `limit` slots are taken.
    pub fn try_take(&self, limit: Option<usize>) -> bool {
        let max = limit.unwrap_or(usize::MAX);
        self.live
            .fetch_update(Relaxed, Relaxed, |n| (n < max).then_some(n + 1))
            .is_ok()
    }
    /// Remember the current count as the peak if it is one.
    pub fn note_peak(&self) {
        self.peak.fetch_max(self.get(), Relaxed);
    }
    /// Give back a slot taken with `try_take`.
    pub fn give(&self) {
        self.live.fetch_sub(1, Relaxed);
    }
    pub fn get(&self) -> usize {
        self.live.load(Relaxed)
    }
    pub fn peak(&self) -> usize {
        self.peak.load(Relaxed)
    }
}

/// Counters of one worker (single writer: that worker).
#[derive(Debug, Default)]
pub struct WorkerStats {
    pub accepted: Counter,
    /// Live pairs on this worker (gauge, set after each batch).
    pub active: Counter,
    pub bytes_to_upstream: Counter,
    pub bytes_to_client: Counter,
    pub connect_fail: [Counter; ConnectFail::COUNT],
    pub accept_pauses: [Counter; PauseCause::COUNT],
    pub closed: [Counter; CloseReason::COUNT],
    /// Access-log records dropped because the log writer fell behind.
    pub access_log_dropped: Counter,
    /// Live pairs moved here from an old process by an upgrade.
    pub migrated_in: Counter,
    /// Live pairs moved from here to a new process by an upgrade.
    pub migrated_out: Counter,
}

/// Counters of one target that survive reloads (shared; written on connect and close only).
#[derive(Debug, Default)]
pub struct TargetCounters {
    pub connect_errors: [AtomicU64; ConnectFail::COUNT],
    /// Live pairs connected or connecting to this target, over all workers.
    pub active: AtomicU32,
}

impl TargetCounters {
    pub fn active(&self) -> u32 {
        self.active.load(Relaxed)
    }
}

/// Bytes relayed for one app by one worker (single writer: that worker).
#[derive(Debug, Default)]
#[repr(align(64))]
pub struct BytesCell {
    pub to_upstream: Counter,
    pub to_client: Counter,
}

/// Counters of one app that survive reloads.
#[derive(Debug)]
pub struct AppCounters {
    /// Live pairs of this app, over all workers (the per-app `max_conns`).
    pub live: Slots,
    pub total: AtomicU64,
    pub closed: [AtomicU64; CloseReason::COUNT],
    /// Pairs that closed with bytes read but never delivered, by close reason.
    pub truncated: [AtomicU64; CloseReason::COUNT],
    /// Indexed by worker id; one more cell at the end holds what an upgrade carried over
    /// from the old process ([`AppCounters::carried`], written by the upgrade reader only).
    pub bytes: Box<[BytesCell]>,
}

impl AppCounters {
    pub fn new(workers: usize) -> AppCounters {
        AppCounters {
            live: Slots::default(),
            total: AtomicU64::new(0),
            closed: Default::default(),
            truncated: Default::default(),
            bytes: (0..workers.max(1) + 1)
                .map(|_| BytesCell::default())
                .collect(),
        }
    }
    pub fn active(&self) -> usize {
        self.live.get()
    }
    /// The cell of bytes carried over by an upgrade (after the workers' cells).
    pub fn carried(&self) -> &BytesCell {
        &self.bytes[self.bytes.len() - 1]
    }
    pub fn bytes_to_upstream(&self) -> u64 {
        self.bytes.iter().map(|b| b.to_upstream.get()).sum()
    }
    pub fn bytes_to_client(&self) -> u64 {
        self.bytes.iter().map(|b| b.to_client.get()).sum()
    }
}

/// A worker's handle on every counter it writes. All writes of the data plane go through here.
pub struct Recorder {
    /// Index of this worker's cell in each app's `bytes`.
    worker: usize,
    cells: Arc<WorkerStats>,
    /// Process-wide live pairs: the global `max_conns`.
    global: Arc<Slots>,
    global_limit: usize,
}

impl Recorder {
    pub fn new(worker: usize, cells: Arc<WorkerStats>, global: Arc<Slots>, limit: usize) -> Self {
        Recorder {
            worker,
            cells,
            global,
            global_limit: limit,
        }
    }

    /// Reserve a global and an app slot for a client about to be accepted. `Err` names the
    /// limit that is reached (nothing is held then).
    pub fn try_reserve(&self, app: &AppCounters, app_limit: Option<usize>) -> Result<(), Limit> {
        if !self.global.try_take(Some(self.global_limit)) {
            return Err(Limit::Global);
        }
        if !app.live.try_take(app_limit) {
            self.global.give();
            return Err(Limit::App);
        }
        Ok(())
    }

    /// Give back a reservation that no client took (the accept found nothing or failed).
    pub fn unreserve(&self, app: &AppCounters) {
        app.live.give();
        self.global.give();
    }

    /// A client was accepted into a reserved slot.
    pub fn record_accept(&self, app: &AppCounters) {
        self.global.note_peak();
        app.live.note_peak();
        app.total.fetch_add(1, Relaxed);
        self.cells.accepted.add(1);
    }

    /// A connect to `target` started: the pair now counts toward its live pairs.
    pub fn record_target_claim(&self, target: &TargetCounters) {
        target.active.fetch_add(1, Relaxed);
    }

    /// The pair no longer counts toward `target` (connect failed, or the pair closed).
    pub fn record_target_release(&self, target: &TargetCounters) {
        target.active.fetch_sub(1, Relaxed);
    }

    /// One connect attempt failed (`target`: the target tried, when it still exists).
    pub fn record_connect_fail(&self, target: Option<&TargetCounters>, fail: ConnectFail) {
        self.cells.connect_fail[fail as usize].add(1);
        if let Some(t) = target {
            t.connect_errors[fail as usize].fetch_add(1, Relaxed);
        }
    }

    /// Bytes written to each side by one relay step.
    #[inline]
    pub fn record_bytes(&self, app: &AppCounters, to_upstream: u64, to_client: u64) {
        self.cells.bytes_to_upstream.add(to_upstream);
        self.cells.bytes_to_client.add(to_client);
        if let Some(cell) = app.bytes.get(self.worker) {
            cell.to_upstream.add(to_upstream);
            cell.to_client.add(to_client);
        }
    }

    /// A pair closed: its slots are given back and the close is counted (`truncated`: bytes
    /// were read from a side and never delivered to the other).
    pub fn record_close(&self, app: &AppCounters, reason: CloseReason, truncated: bool) {
        app.closed[reason as usize].fetch_add(1, Relaxed);
        if truncated {
            app.truncated[reason as usize].fetch_add(1, Relaxed);
        }
        self.cells.closed[reason as usize].add(1);
        self.unreserve(app);
    }

    /// A pair moved to a new process: its slots are given back; it is not a close.
    pub fn record_migrated_out(&self, app: &AppCounters) {
        self.cells.migrated_out.add(1);
        self.unreserve(app);
    }

    /// A pair moved here from an old process (its slots were reserved by the caller).
    pub fn record_migrated_in(&self) {
        self.global.note_peak();
        self.cells.migrated_in.add(1);
    }

    /// A client refused before it became a pair (it held a reservation).
    pub fn record_refused(&self, app: &AppCounters, reason: CloseReason) {
        self.cells.closed[reason as usize].add(1);
        self.unreserve(app);
    }

    pub fn record_pause(&self, cause: PauseCause) {
        self.cells.accept_pauses[cause as usize].add(1);
    }

    pub fn record_access_log_drop(&self) {
        self.cells.access_log_dropped.add(1);
    }

    /// Live pairs on this worker, after a batch.
    pub fn set_active(&self, n: usize) {
        self.cells.active.set(n as u64);
    }

    /// Process-wide live pairs.
    pub fn global_active(&self) -> usize {
        self.global.get()
    }
}

/// Which limit refused a reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Global,
    App,
}

/// One live pair, as the admin endpoint lists it.
#[derive(Debug, Clone)]
pub struct ConnInfo {
    pub worker: usize,
    pub client: SocketAddr,
    pub app: String,
    pub target: Option<String>,
    pub state: &'static str,
    pub age: Duration,
    pub bytes_to_upstream: u64,
    pub bytes_to_client: u64,
    /// The TLS server name the client asked for (SNI-routed apps).
    pub server_name: Option<String>,
}

/// Totals over all workers: the shutdown summary and the periodic line.
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
    pub access_log_dropped: u64,
}

impl Summary {
    pub fn collect<'a>(
        workers: impl IntoIterator<Item = &'a WorkerStats>,
        global: &Slots,
        uptime: Duration,
    ) -> Summary {
        let mut s = Summary {
            uptime,
            peak_concurrent: global.peak() as u64,
            ..Summary::default()
        };
        for w in workers {
            s.accepted += w.accepted.get();
            s.active += w.active.get();
            s.bytes_client_to_upstream += w.bytes_to_upstream.get();
            s.bytes_upstream_to_client += w.bytes_to_client.get();
            s.access_log_dropped += w.access_log_dropped.get();
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_never_exceed_their_limit() {
        let s = Arc::new(Slots::default());
        let threads: Vec<_> = (0..4)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    (0..10_000)
                        .filter(|_| s.try_take(Some(100)))
                        .inspect(|_| s.note_peak())
                        .count()
                })
            })
            .collect();
        let taken: usize = threads.into_iter().map(|t| t.join().unwrap_or(0)).sum();
        assert_eq!(taken, 100);
        assert_eq!(s.get(), 100);
        assert_eq!(s.peak(), 100);
        s.give();
        assert!(s.try_take(Some(100)));
        assert!(!s.try_take(Some(100)));
    }

    #[test]
    fn a_close_gives_back_both_slots_and_counts_once() {
        let global = Arc::new(Slots::default());
        let cells = Arc::new(WorkerStats::default());
        let r = Recorder::new(0, cells.clone(), global.clone(), 2);
        let app = AppCounters::new(1);
        assert_eq!(r.try_reserve(&app, Some(1)), Ok(()));
        assert_eq!(r.try_reserve(&app, Some(1)), Err(Limit::App));
        assert_eq!(
            global.get(),
            1,
            "a refused app slot gives the global slot back"
        );
        r.record_accept(&app);
        r.record_close(&app, CloseReason::ClientReset, true);
        assert_eq!((global.get(), app.active()), (0, 0));
        assert_eq!(
            app.closed[CloseReason::ClientReset as usize].load(Relaxed),
            1
        );
        assert_eq!(
            app.truncated[CloseReason::ClientReset as usize].load(Relaxed),
            1
        );
        let s = Summary::collect([cells.as_ref()], &global, Duration::ZERO);
        assert_eq!((s.accepted, s.closed_total(), s.peak_concurrent), (1, 1, 1));
    }
}
