//! Upstream connects: pick the ordered candidates from the app's balancer, start a
//! non-blocking connect, complete it with mio's procedure (WRITABLE, then `take_error()`, then
//! `peer_addr()`; `NotConnected` = still in flight), and fail over to the next candidate on
//! refusal, error or timeout. Feeds passive health. Never blocks.

use std::io;

use super::Worker;
use super::pair::{MAX_ATTEMPTS, PairState};
use super::token;
use crate::health;
use crate::net;
use crate::outcome::{CloseReason, ConnectFail, PauseCause, Side};

impl Worker {
    /// Fill the pair's candidate list from route `route` of app `app_idx` (balancer order; up
    /// targets first), as indices into the pair's app targets.
    pub(super) fn choose_candidates(&mut self, idx: usize, app_idx: usize, route: usize) {
        let Some(pair) = self.pairs.get_mut(idx) else {
            return;
        };
        let app = &pair.app;
        let now_ms = health::now_ms();
        let (Some(balancer), Some(r)) = (
            self.balancers
                .get_mut(app_idx)
                .and_then(|b| b.get_mut(route)),
            app.routes.get(route),
        ) else {
            pair.n_candidates = 0;
            return;
        };
        let members = &r.members;
        let target = |i: usize| members.get(i).and_then(|&m| app.targets.get(m));
        let up = |i: usize| target(i).is_some_and(|t| t.health.is_up(now_ms));
        let active = |i: usize| target(i).map_or(0, |t| t.active());
        let all_down = balancer.candidates(pair.client_addr.ip(), &up, &active, &mut self.scratch);
        if all_down {
            log::debug!(
                "app '{}': every target is down; trying all (fail open)",
                app.cfg.name
            );
        }
        let limit = app
            .cfg
            .retries
            .map_or(usize::MAX, |r| r.saturating_add(1))
            .min(MAX_ATTEMPTS);
        let n = self.scratch.len().min(limit);
        for (slot, &i) in pair.candidates.iter_mut().zip(&self.scratch[..n]) {
            *slot = members.get(i as usize).map_or(u16::MAX, |&m| m as u16);
        }
        pair.n_candidates = n as u8;
        pair.attempt = 0;
    }

    /// Start connecting to the candidate at `pair.attempt`, moving on past immediate failures.
    /// Closes the pair with `NoBackend` when no candidate is left.
    pub(super) fn start_connect(&mut self, idx: usize) {
        loop {
            let Some(pair) = self.pairs.get_mut(idx) else {
                return;
            };
            if pair.attempt >= pair.n_candidates {
                self.close(idx, CloseReason::NoBackend);
                return;
            }
            pair.target = pair.candidates[pair.attempt as usize];
            let target = usize::from(pair.target);
            let app = &pair.app;
            let Some(t) = app.targets.get(target) else {
                pair.attempt += 1;
                continue;
            };
            match net::connect_nonblocking(t.cfg.addr) {
                Err(e) if is_fd_exhaustion(&e) => {
                    // Our own limit, not the target's: wait for a descriptor (the timer
                    // retries), pause accepting meanwhile, and never drop the client for it.
                    if !pair.waiting_fd {
                        pair.waiting_fd = true;
                        pair.deadline = self.now + app.cfg.connect_timeout;
                    }
                    if self.accept_backoff_until.is_none() {
                        self.accept_backoff_until = Some(self.now + super::EMFILE_BACKOFF);
                        self.rec.record_pause(PauseCause::Emfile);
                    }
                    return;
                }
                Ok(sock) => {
                    let timeout = app.cfg.connect_timeout;
                    pair.waiting_fd = false;
                    pair.set_upstream(sock, &self.rec);
                    pair.connect_started = self.now;
                    pair.deadline = self.now + timeout;
                    let want = pair.wanted_interest(Side::Upstream);
                    Worker::set_interest(
                        self.poll.registry(),
                        &mut pair.upstream,
                        token::pair(idx, Side::Upstream),
                        want,
                    );
                    if pair.upstream.interest.is_none() {
                        self.connect_failed(idx, ConnectFail::Other);
                    }
                    return;
                }
                Err(e) => {
                    self.count_connect_fail(idx, ConnectFail::from_io(e.kind()));
                    if let Some(pair) = self.pairs.get_mut(idx) {
                        pair.attempt += 1;
                    }
                }
            }
        }
    }

    pub(super) fn on_connect_event(&mut self, idx: usize) {
        let Some(pair) = self.pairs.get_mut(idx) else {
            return;
        };
        let Some(sock) = pair.upstream.sock.as_ref() else {
            return;
        };
        match sock.take_error() {
            Ok(None) => {}
            // The handshake completed and the target reset the connection before this
            // event was handled: not a connect failure but an upstream reset, passed on to
            // the client as a reset (a plain close would look like an empty, complete reply).
            Ok(Some(e))
                if matches!(
                    e.kind(),
                    io::ErrorKind::ConnectionReset | io::ErrorKind::ConnectionAborted
                ) =>
            {
                self.close(idx, CloseReason::UpstreamReset);
                return;
            }
            Ok(Some(e)) | Err(e) => {
                self.connect_failed(idx, ConnectFail::from_io(e.kind()));
                return;
            }
        }
        // mio's procedure asks `peer_addr` to tell a completed connect from a spurious
        // wake-up. With epoll, EPOLLOUT on a connecting socket is raised only when the
        // handshake finished (a failure also sets SO_ERROR, checked above), so a writable
        // event without a hang-up and with SO_ERROR clear is a connect: the getpeername is
        // kept only for other wake-ups (readable-only, or a hang-up).
        if pair.upstream.writable && !pair.upstream.peer_closed {
            self.connected(idx);
            return;
        }
        match sock.peer_addr() {
            Ok(_) => self.connected(idx),
            Err(e) if e.kind() == io::ErrorKind::NotConnected => {
                // Spurious wake-up: still connecting.
                pair.upstream.writable = false;
            }
            Err(e) => self.connect_failed(idx, ConnectFail::from_io(e.kind())),
        }
    }

    fn connected(&mut self, idx: usize) {
        let Some(pair) = self.pairs.get_mut(idx) else {
            return;
        };
        pair.state = PairState::Open;
        self.setting_up -= 1;
        pair.upstream.writable = true;
        pair.last_active = self.now;
        let took = self.now.saturating_duration_since(pair.connect_started);
        pair.set_connect_time(took);
        if let Some(t) = pair.app.targets.get(usize::from(pair.target)) {
            t.health.on_connect_ok();
        }
        self.relay(idx);
    }

    fn count_connect_fail(&mut self, idx: usize, fail: ConnectFail) {
        let Some(pair) = self.pairs.get(idx) else {
            return;
        };
        let app = &pair.app;
        let target = app.targets.get(usize::from(pair.target));
        self.rec
            .record_connect_fail(target.map(|t| t.counters.as_ref()), fail);
        if let Some(t) = target
            && t.health.on_connect_fail(health::now_ms(), &app.cfg.health)
        {
            log::warn!(
                "app '{}' target {} is DOWN ({} connect failures in a row, last: {})",
                app.cfg.name,
                t.cfg.name,
                app.cfg.health.fall,
                fail.as_str()
            );
        }
    }

    /// The attempt in flight failed: drop its socket and try the next candidate.
    pub(super) fn connect_failed(&mut self, idx: usize, fail: ConnectFail) {
        self.count_connect_fail(idx, fail);
        let Some(pair) = self.pairs.get_mut(idx) else {
            return;
        };
        pair.drop_upstream(&self.rec);
        pair.attempt += 1;
        self.start_connect(idx);
    }
}

/// Out of file descriptors (process or system).
pub(super) fn is_fd_exhaustion(e: &io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::EMFILE) | Some(libc::ENFILE))
}
