//! The coarse timer: every `TICK` (only while something needs it) scan the pairs for connect
//! deadlines and idle timeouts, and end the grace period. A scan of a few thousand slots costs
//! microseconds; it runs into preallocated scratch and never allocates.

use super::pair::PairState;
use super::{TICK, Worker};
use crate::outcome::{CloseReason, ConnectFail};

impl Worker {
    pub(super) fn on_tick(&mut self) {
        self.next_tick = self.now + TICK;
        if let Some(deadline) = self.grace_deadline
            && self.now >= deadline
        {
            let n = self.pairs.len();
            if n > 0 {
                log::info!(
                    "worker {}: grace period over; closing {n} connections",
                    self.id
                );
            }
            self.close_all(CloseReason::Shutdown);
            return;
        }
        if self.setting_up == 0 && !self.idle_timeouts {
            return;
        }
        self.expired.clear();
        let now = self.now;
        let fd_retry = self.accept_backoff_until.is_none();
        for (idx, pair) in self.pairs.iter() {
            if pair.parked {
                continue;
            }
            let due = match pair.state {
                PairState::Preface => (now >= pair.deadline).then_some(Due::Preface),
                PairState::Connecting if pair.waiting_fd && now >= pair.deadline => Some(Due::NoFd),
                PairState::Connecting if pair.waiting_fd => fd_retry.then_some(Due::Retry),
                PairState::Connecting => (now >= pair.deadline).then_some(Due::ConnectTimeout),
                PairState::Open | PairState::HalfClosed => pair
                    .app
                    .cfg
                    .idle_timeout
                    .filter(|idle| now.saturating_duration_since(pair.last_active) >= *idle)
                    .map(|_| Due::Idle),
                PairState::Closed => None,
            };
            if let Some(due) = due {
                self.expired.push((idx, due));
            }
        }
        for i in 0..self.expired.len() {
            let (idx, due) = self.expired[i];
            match due {
                Due::ConnectTimeout => self.connect_failed(idx, ConnectFail::Timeout),
                Due::Idle => self.close(idx, CloseReason::IdleTimeout),
                Due::Retry => self.start_connect(idx),
                Due::NoFd => self.close(idx, CloseReason::NoBackend),
                Due::Preface => self.on_preface_timeout(idx),
            }
        }
    }
}

/// What the timer found due for a pair.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Due {
    ConnectTimeout,
    Idle,
    /// Retry a connect that found no free file descriptor.
    Retry,
    /// Gave up waiting for a file descriptor.
    NoFd,
    /// The client's preface (PROXY header, ClientHello) did not complete in time.
    Preface,
}
