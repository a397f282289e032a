//! Accepting: drain a listener until `WouldBlock`, admit each client into a new pair, and
//! pause instead of spinning when a limit is reached (global or per-app `max_conns`, with
//! hysteresis) or file descriptors run out (EMFILE/ENFILE, retried on the timer). A paused
//! listener keeps its sticky readiness, so accepting resumes without waiting for a new edge.
//! Never accepts a connection only to drop it: the global and per-app slots are reserved
//! *before* `accept(2)` (given back if it finds nothing), so both limits are exact across
//! workers.

use std::io;

use super::pair::{Pair, PairState};
use super::token;
use super::{EMFILE_BACKOFF, Worker};
use crate::backend::resume_mark;
use crate::outcome::{CloseReason, PauseCause, Side};
use crate::stats::Limit;

impl Worker {
    pub(super) fn on_listener_event(&mut self, i: usize) {
        if let Some(Some(l)) = self.listeners.get_mut(i) {
            l.readable = true;
            self.accept_on(i);
        }
    }

    pub(super) fn accept_all(&mut self) {
        for i in 0..self.listeners.len() {
            self.accept_on(i);
        }
    }

    /// Reserve the slots for one more client of `app`, or say no and pause (counting the
    /// pause on the transition). `true` = the caller holds a reservation it must either give
    /// to a pair or give back (`Recorder::unreserve`).
    fn admit(&mut self, app: usize) -> bool {
        if self.accept_backoff_until.is_some()
            || self.grace_deadline.is_some()
            || self.limit_paused
            || self.app_paused[app]
        {
            return false;
        }
        // The slab also holds pairs closed in this batch until it ends: count them too, so an
        // accepted client always finds a slot.
        let full = self.pairs.len() >= self.pairs.capacity();
        let a = &self.apps[app];
        let res = if full {
            Err(Limit::Global)
        } else {
            self.rec.try_reserve(&a.counters, a.cfg.max_conns)
        };
        match res {
            Ok(()) => return true,
            Err(Limit::Global) => {
                self.limit_paused = true;
                log::debug!(
                    "worker {}: max_conns {} reached, pausing accept",
                    self.id,
                    self.max_conns
                );
            }
            Err(Limit::App) => self.app_paused[app] = true,
        }
        self.rec.record_pause(PauseCause::Limit);
        false
    }

    fn accept_on(&mut self, i: usize) {
        loop {
            let (app, readable) = match self.listeners.get(i) {
                Some(Some(l)) => (l.app, l.readable),
                _ => return,
            };
            if !readable || !self.admit(app) {
                return;
            }
            let res = match self.listeners.get_mut(i) {
                Some(Some(l)) => l.sock.accept(),
                _ => Err(io::ErrorKind::NotFound.into()),
            };
            let e = match res {
                Ok((sock, addr)) => {
                    self.on_accept(sock, addr, app);
                    continue;
                }
                Err(e) => e,
            };
            // Nothing was accepted: the reservation goes back.
            self.rec.unreserve(&self.apps[app].counters);
            match e {
                e if e.kind() == io::ErrorKind::NotFound => return,
                e if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(Some(l)) = self.listeners.get_mut(i) {
                        l.readable = false;
                    }
                    return;
                }
                e if e.kind() == io::ErrorKind::Interrupted
                    || e.kind() == io::ErrorKind::ConnectionAborted =>
                {
                    continue;
                }
                e if is_resource_exhaustion(&e) => {
                    self.accept_backoff_until = Some(self.now + EMFILE_BACKOFF);
                    self.rec.record_pause(PauseCause::Emfile);
                    log::debug!("worker {}: accept: {e}; pausing accept", self.id);
                    return;
                }
                e => {
                    // Not expected from accept4 on a listening socket; back off rather than
                    // spin on an edge-triggered listener that may keep failing.
                    log::warn!("worker {}: accept: {e}; pausing accept briefly", self.id);
                    self.accept_backoff_until = Some(self.now + EMFILE_BACKOFF);
                    return;
                }
            }
        }
    }

    /// A client accepted into a reserved slot becomes a pair and starts connecting.
    fn on_accept(&mut self, sock: mio::net::TcpStream, addr: std::net::SocketAddr, app: usize) {
        // TCP_NODELAY comes from the listener (Linux copies it to accepted sockets; see
        // `net::bind_listener`): no setsockopt per connection.
        let app_rt = self.apps[app].clone();
        if self.pairs.len() >= self.pairs.capacity() {
            // Cannot happen: `admit` checks the slab before reserving. Refuse loudly rather
            // than grow the slab on the hot path.
            log::warn!(
                "worker {}: pair table full; closing new client {addr}",
                self.id
            );
            self.rec
                .record_refused(&app_rt.counters, CloseReason::Internal);
            return;
        }
        self.rec.record_accept(&app_rt.counters);
        let entry = self.pairs.vacant_entry();
        let idx = entry.key();
        let preface = Worker::needs_preface(&app_rt);
        let deadline = self.now + app_rt.cfg.proxy_header_timeout;
        let (splice, auto) = (app_rt.cfg.splice, app_rt.cfg.splice_auto);
        let mut pair = Pair::new(sock, addr, app_rt, app, self.now);
        pair.splice = splice;
        pair.splice_auto = auto && !splice;
        if preface {
            pair.state = PairState::Preface;
            pair.deadline = deadline;
        }
        entry.insert(pair);
        self.setting_up += 1;
        self.rec.set_active(self.pairs.len());
        let registry = self.poll.registry();
        let pair = &mut self.pairs[idx];
        Worker::set_interest(
            registry,
            &mut pair.client,
            token::pair(idx, Side::Client),
            mio::Interest::READABLE,
        );
        if !preface {
            // Registering a socket with bytes queued raises an event, so a preface waits for
            // it; a pair without one is admitted now.
            self.admit_pair(idx, 0, None);
        }
    }

    /// Called after each batch: resume accepting once below the limits, or after the EMFILE
    /// back-off.
    pub(super) fn maybe_resume_accepting(&mut self) {
        let mut resume = false;
        if let Some(until) = self.accept_backoff_until
            && self.now >= until
        {
            self.accept_backoff_until = None;
            resume = true;
        }
        if self.limit_paused && self.rec.global_active() <= resume_mark(self.max_conns) {
            self.limit_paused = false;
            resume = true;
        }
        for app in 0..self.app_paused.len() {
            if self.app_paused[app] && self.apps[app].below_resume() {
                self.app_paused[app] = false;
                resume = true;
            }
        }
        if resume {
            self.accept_all();
        }
    }
}

fn is_resource_exhaustion(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOBUFS) | Some(libc::ENOMEM)
    )
}
