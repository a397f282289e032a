//! The coarse timer: every `TICK` (only while something needs it) scan the pairs for connect
//! deadlines and idle timeouts, and end the grace period. A scan of a few thousand slots costs
//! microseconds; it runs into preallocated scratch and never allocates.

use super::pair::{CloseReason, ConnectFail, PairState};
use super::{TICK, Worker};

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
        if self.connecting == 0 && !self.idle_timeouts {
            return;
        }
        self.expired.clear();
        let now = self.now;
        for (idx, pair) in self.pairs.iter() {
            match pair.state {
                PairState::Connecting => {
                    if now >= pair.deadline {
                        self.expired.push((idx, true));
                    }
                }
                PairState::Open | PairState::HalfClosed => {
                    if let Some(idle) = pair.app.cfg.idle_timeout
                        && now.saturating_duration_since(pair.last_active) >= idle
                    {
                        self.expired.push((idx, false));
                    }
                }
                PairState::Closed => {}
            }
        }
        for i in 0..self.expired.len() {
            let (idx, connecting) = self.expired[i];
            if connecting {
                self.connect_failed(idx, ConnectFail::Timeout);
            } else {
                self.close(idx, CloseReason::IdleTimeout);
            }
        }
    }
}
