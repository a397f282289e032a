//! Accepting: drain a listener until `WouldBlock`, admit each client into a new pair, and
//! pause instead of spinning when a limit is reached (global or per-app `max_conns`, with
//! hysteresis) or file descriptors run out (EMFILE/ENFILE, retried on the timer). A paused
//! listener keeps its sticky readiness, so accepting resumes without waiting for a new edge.
//! Never accepts a connection only to drop it.

use std::io;
use std::sync::atomic::Ordering::Relaxed;

use super::pair::Pair;
use super::token::{self, Side};
use super::{EMFILE_BACKOFF, Worker};
use crate::backend::resume_mark;
use crate::net;
use crate::stats::PauseCause;

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

    /// Whether new pairs may be admitted for `app` now (counts a pause on the transition).
    fn admit(&mut self, app: usize) -> bool {
        if self.emfile_until.is_some() || self.grace_deadline.is_some() {
            return false;
        }
        if self.limit_paused {
            return false;
        }
        // The slab also holds pairs closed in this batch until it ends: count them too, so an
        // accepted client always finds a slot.
        if self.shared.active() >= self.max_conns || self.pairs.len() >= self.pairs.capacity() {
            self.limit_paused = true;
            self.count_pause(PauseCause::Limit);
            log::debug!(
                "worker {}: max_conns {} reached, pausing accept",
                self.id,
                self.max_conns
            );
            return false;
        }
        if self.app_paused[app] {
            return false;
        }
        if self.apps[app].at_limit() {
            self.app_paused[app] = true;
            self.count_pause(PauseCause::Limit);
            return false;
        }
        true
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
                _ => return,
            };
            match res {
                Ok((sock, addr)) => self.on_accept(sock, addr, app),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    if let Some(Some(l)) = self.listeners.get_mut(i) {
                        l.readable = false;
                    }
                    return;
                }
                Err(e)
                    if e.kind() == io::ErrorKind::Interrupted
                        || e.kind() == io::ErrorKind::ConnectionAborted =>
                {
                    continue;
                }
                Err(e) if is_resource_exhaustion(&e) => {
                    self.emfile_until = Some(self.now + EMFILE_BACKOFF);
                    self.count_pause(PauseCause::Emfile);
                    log::debug!("worker {}: accept: {e}; pausing accept", self.id);
                    return;
                }
                Err(e) => {
                    log::warn!("worker {}: accept: {e}", self.id);
                    self.emfile_until = Some(self.now + EMFILE_BACKOFF);
                    return;
                }
            }
        }
    }

    fn on_accept(&mut self, sock: mio::net::TcpStream, addr: std::net::SocketAddr, app: usize) {
        if let Err(e) = net::tune_accepted(&sock) {
            log::debug!("tune accepted socket: {e}");
        }
        if self.pairs.len() >= self.pairs.capacity() {
            // Cannot happen while the global limit holds (capacity = max_conns); refuse
            // loudly rather than grow the slab on the hot path.
            log::warn!(
                "worker {}: pair table full; closing new client {addr}",
                self.id
            );
            self.stats.closed[super::pair::CloseReason::Internal as usize].add(1);
            return;
        }
        self.shared.open();
        let app_rt = self.apps[app].clone();
        app_rt.counters.active.fetch_add(1, Relaxed);
        app_rt.counters.total.fetch_add(1, Relaxed);
        self.stats.accepted.add(1);
        let entry = self.pairs.vacant_entry();
        let idx = entry.key();
        let splice = app_rt.cfg.splice;
        let mut pair = Pair::new(sock, addr, app_rt, self.now);
        pair.splice = splice;
        entry.insert(pair);
        self.connecting += 1;
        self.stats.set_active(self.pairs.len());
        let registry = self.poll.registry();
        let pair = &mut self.pairs[idx];
        let want = mio::Interest::READABLE;
        Worker::set_interest(
            registry,
            &mut pair.client,
            token::pair(idx, Side::Client),
            want,
        );
        self.choose_candidates(idx, app);
        self.start_connect(idx);
    }

    /// Called after each batch: resume accepting once below the limits, or after the EMFILE
    /// back-off.
    pub(super) fn maybe_resume_accepting(&mut self) {
        let mut resume = false;
        if let Some(until) = self.emfile_until
            && self.now >= until
        {
            self.emfile_until = None;
            resume = true;
        }
        if self.limit_paused && self.shared.active() <= resume_mark(self.max_conns) {
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
