//! Moving live pairs between processes during an upgrade (`upgrade_migrate`), the worker's
//! part. Old process: `Worker::export` parks established pairs (both sockets deregistered,
//! nothing read or written from then on) and describes each as a [`PairRecord`] with
//! duplicates of its two sockets; `Worker::settle` then forgets the pairs the new process
//! took (closing only this process's copies: no FIN, no reset) and resumes the others exactly
//! where they stopped. New process: `Worker::adopt` rebuilds each pair (buffers refilled,
//! counters, flags, age and idle time kept) and registers it. The control threads of the two
//! processes decide who owns what (see `upgrade.rs`): a pair is never served by both.

use std::os::fd::{AsFd, OwnedFd};
use std::sync::Arc;
use std::time::Duration;

use super::pair::{Pair, PairState};
use super::{Worker, name_of, preface};
use crate::backend::AppRuntime;
use crate::migrate::{FlowRecord, MovedState, PairRecord};

/// A parked pair, described: its slot here, its record, its client and upstream sockets.
pub struct Export {
    pub idx: usize,
    pub record: PairRecord,
    pub fds: [OwnedFd; 2],
}

/// What `export` found.
pub struct Exported {
    pub pairs: Vec<Export>,
    /// Pairs not movable yet (preface, connecting, bytes in a splice pipe): worth waiting for.
    pub waiting: usize,
}

/// A pair to rebuild here, checked and with its slots (global and app) already reserved.
pub struct Import {
    pub record: PairRecord,
    pub app: Arc<AppRuntime>,
    /// Index of the record's target in `app.targets`.
    pub target: usize,
    pub client: std::net::TcpStream,
    pub upstream: std::net::TcpStream,
}

fn flow_record(f: &super::pair::Flow, data: Vec<u8>) -> FlowRecord {
    FlowRecord {
        read: f.read,
        written: f.written,
        header: f.header,
        eof: f.eof,
        shut: f.shut,
        data,
    }
}

/// Largest number of bytes a flow may hold in a pipe and still move (the capacity pipes are
/// grown to: the new process writes them into a pipe of its own, grown to fit).
pub const MAX_PIPED: usize = crate::worker::relay::PIPE_SIZE;

/// A copy of the `piped` bytes sitting in `pipe`, left in place (tee(2) into a scratch pipe,
/// then read). `None`: they could not be copied whole.
fn copy_piped(pipe: &crate::sys::Pipe, piped: usize) -> Option<Vec<u8>> {
    use std::os::fd::AsRawFd;
    if piped > MAX_PIPED {
        return None;
    }
    let scratch = crate::sys::pipe().ok()?;
    // tee(2) copies the pipe's slots: the scratch pipe needs as many as the source has.
    let cap = crate::sys::pipe_size(pipe).ok()?;
    if cap > crate::sys::pipe_size(&scratch).ok()? {
        crate::sys::set_pipe_size(&scratch, cap).ok()?;
    }
    let n = crate::sys::tee(pipe.r.as_raw_fd(), scratch.w.as_raw_fd(), piped).ok()?;
    if n != piped {
        return None;
    }
    let mut out = vec![0u8; piped];
    let mut got = 0;
    while got < piped {
        match crate::sys::read_fd(scratch.r.as_raw_fd(), &mut out[got..]) {
            Ok(0) | Err(_) => return None,
            Ok(k) => got += k,
        }
    }
    Some(out)
}

/// Whether a server name fits the record (the preface keeps what the client sent).
fn record_name(b: &[u8]) -> String {
    if b.iter()
        .all(|c| c.is_ascii_alphanumeric() || b"-_.:*[]%".contains(c))
    {
        String::from_utf8_lossy(b).into_owned()
    } else {
        String::new()
    }
}

impl Worker {
    /// Park up to `max` established pairs and describe them. Allocates (an upgrade is not
    /// the relay path).
    pub(super) fn export(&mut self, max: usize) -> Exported {
        let mut out = Exported {
            pairs: Vec::new(),
            waiting: 0,
        };
        let now = self.now.max(std::time::Instant::now());
        let cap = self.pairs.capacity();
        for idx in 0..cap {
            if out.pairs.len() >= max {
                break;
            }
            let Some(pair) = self.pairs.get_mut(idx) else {
                continue;
            };
            if pair.parked {
                continue;
            }
            match pair.state {
                PairState::Open | PairState::HalfClosed => {}
                PairState::Preface | PairState::Connecting => {
                    out.waiting += 1;
                    continue;
                }
                PairState::Closed => continue,
            }
            // Bytes in a pipe (splice) are copied, not consumed: an aborted move finds the
            // pair exactly as it was.
            let mut piped_copy: [Option<Vec<u8>>; 2] = [None, None];
            let mut copied = true;
            for (slot, flow) in piped_copy
                .iter_mut()
                .zip([&pair.to_upstream, &pair.to_client])
            {
                if flow.piped > 0 {
                    match flow.pipe.as_ref().and_then(|p| copy_piped(p, flow.piped)) {
                        Some(v) => *slot = Some(v),
                        None => copied = false,
                    }
                }
            }
            if !copied {
                out.waiting += 1;
                continue;
            }
            let (Some(c), Some(u)) = (pair.client.sock.as_ref(), pair.upstream.sock.as_ref())
            else {
                continue;
            };
            let fds = match (
                c.as_fd().try_clone_to_owned(),
                u.as_fd().try_clone_to_owned(),
            ) {
                (Ok(a), Ok(b)) => [a, b],
                (a, b) => {
                    let e = a.err().or(b.err());
                    log::warn!(
                        "worker {}: migrate: duplicate sockets: {e:?}; the rest stay here",
                        self.id
                    );
                    break;
                }
            };
            // Stop: no more events, reads or writes for this pair here.
            let registry = self.poll.registry();
            for half in [&mut pair.client, &mut pair.upstream] {
                if half.interest.take().is_some()
                    && let Some(s) = half.sock.as_mut()
                {
                    let _ = registry.deregister(s);
                }
            }
            pair.parked = true;
            let [up_piped, down_piped] = piped_copy;
            let up = up_piped.unwrap_or_else(|| pair.to_upstream.buf.data(&mut self.pool).to_vec());
            let down =
                down_piped.unwrap_or_else(|| pair.to_client.buf.data(&mut self.pool).to_vec());
            let record = PairRecord {
                app: pair.app.cfg.name.clone(),
                target: pair
                    .app
                    .targets
                    .get(usize::from(pair.target))
                    .map(|t| t.cfg.name.clone())
                    .unwrap_or_default(),
                server_name: record_name(name_of(&self.names, idx, pair.sni_len)),
                client_addr: pair.client_addr,
                state: if pair.state == PairState::Open {
                    MovedState::Open
                } else {
                    MovedState::HalfClosed
                },
                client_peer_closed: pair.client.peer_closed,
                upstream_peer_closed: pair.upstream.peer_closed,
                splice: pair.splice,
                proxy_header_sent: pair.app.cfg.send_proxy.is_some(),
                age: now.saturating_duration_since(pair.started),
                idle: now
                    .saturating_duration_since(pair.last_active)
                    .min(now.saturating_duration_since(pair.started)),
                connect_time: pair.connect_time(),
                to_upstream: flow_record(&pair.to_upstream, up),
                to_client: flow_record(&pair.to_client, down),
            };
            out.pairs.push(Export { idx, record, fds });
        }
        out
    }

    /// The new process took `commit`: forget them (close this process's copies only). It did
    /// not take `abort`: serve them again from where they stopped.
    pub(super) fn settle(&mut self, commit: &[usize], abort: &[usize]) {
        for &idx in commit {
            self.forget(idx);
        }
        for &idx in abort {
            let Some(pair) = self.pairs.get_mut(idx) else {
                continue;
            };
            if !pair.parked {
                continue;
            }
            pair.parked = false;
            // Sticky readiness is kept; registering reports what is pending anyway.
            self.relay(idx);
        }
        self.release_closed();
    }

    /// A parked pair now owned by the new process: give back what it holds here and drop
    /// it without touching the connections.
    fn forget(&mut self, idx: usize) {
        let Some(pair) = self.pairs.get_mut(idx) else {
            return;
        };
        if !pair.parked || pair.state == PairState::Closed {
            return;
        }
        pair.state = PairState::Closed;
        pair.parked = false;
        for flow in [&mut pair.to_upstream, &mut pair.to_client] {
            flow.buf.release(&mut self.pool, true);
            if let Some(p) = flow.pipe.take() {
                self.pipes.give(p, flow.piped == 0);
                flow.piped = 0;
            }
        }
        if pair.source_counted
            && let Some(t) = &pair.app.sources
        {
            t.remove(pair.client_addr.ip());
            pair.source_counted = false;
        }
        self.rec.record_migrated_out(&pair.app.counters);
        // Plain closes of our duplicates: the new process holds the connections.
        pair.drop_upstream(&self.rec);
        drop(pair.client.sock.take());
        pair.client.interest = None;
        self.closing.push(idx);
    }

    /// Rebuild pairs moved here by an upgrade and start serving them. Their slots were
    /// reserved by the caller; a pair that cannot be rebuilt is closed (counted).
    pub(super) fn adopt(&mut self, imports: Vec<Import>) {
        let now = std::time::Instant::now();
        self.now = now;
        for imp in imports {
            let rec = imp.record;
            let app_idx = self
                .apps
                .iter()
                .position(|a| Arc::ptr_eq(a, &imp.app))
                .unwrap_or(u32::MAX as usize);
            let client = mio::net::TcpStream::from_std(imp.client);
            let upstream = mio::net::TcpStream::from_std(imp.upstream);
            let mut pair = Pair::new(client, rec.client_addr, imp.app.clone(), app_idx, now);
            pair.state = match rec.state {
                MovedState::Open => PairState::Open,
                MovedState::HalfClosed => PairState::HalfClosed,
            };
            pair.started = now.checked_sub(rec.age).unwrap_or(now);
            pair.last_active = now.checked_sub(rec.idle).unwrap_or(now);
            pair.connect_started = pair.started;
            pair.set_connect_time(rec.connect_time);
            pair.target = u16::try_from(imp.target).unwrap_or(u16::MAX);
            pair.candidates[0] = pair.target;
            pair.n_candidates = 1;
            pair.attempt = 1;
            pair.splice = rec.splice && imp.app.cfg.splice;
            pair.splice_auto = imp.app.cfg.splice_auto && !pair.splice;
            pair.client.readable = true;
            pair.client.writable = true;
            pair.client.peer_closed = rec.client_peer_closed;
            pair.set_upstream(upstream, &self.rec);
            pair.upstream.readable = true;
            pair.upstream.writable = true;
            pair.upstream.peer_closed = rec.upstream_peer_closed;
            let mut ok = true;
            for (flow, r) in [
                (&mut pair.to_upstream, &rec.to_upstream),
                (&mut pair.to_client, &rec.to_client),
            ] {
                flow.read = r.read;
                flow.written = r.written;
                flow.header = r.header;
                flow.eof = r.eof;
                flow.shut = r.shut;
                if r.data.len() > self.pool.buffer_size() {
                    // They were in a pipe in the old process: back into a pipe.
                    match self.pipes.take_any() {
                        Some(p) => {
                            use std::os::fd::AsRawFd;
                            // A pipe of the old process may have been larger than this one.
                            ok &= self.pipes.fit(&p, r.data.len());
                            let mut put = 0;
                            while put < r.data.len() {
                                match crate::sys::write_fd(p.w.as_raw_fd(), &r.data[put..]) {
                                    Ok(n) if n > 0 => put += n,
                                    _ => break,
                                }
                            }
                            ok &= put == r.data.len();
                            flow.piped = put;
                            flow.pipe = Some(p);
                        }
                        None => ok = false,
                    }
                } else if !r.data.is_empty() {
                    match flow.buf.space(&mut self.pool) {
                        Some(space) if space.len() >= r.data.len() => {
                            space[..r.data.len()].copy_from_slice(&r.data);
                            flow.buf.filled(r.data.len());
                        }
                        _ => ok = false,
                    }
                }
            }
            if let Some(t) = &imp.app.sources {
                pair.source_counted = t.try_add(rec.client_addr.ip(), usize::MAX);
            }
            let Some(entry) =
                (self.pairs.len() < self.pairs.capacity()).then(|| self.pairs.vacant_entry())
            else {
                log::error!("worker {}: migrate: no free slot for a moved pair", self.id);
                self.drop_unadopted(pair);
                continue;
            };
            let idx = entry.key();
            entry.insert(pair);
            if !rec.server_name.is_empty() {
                let n = rec.server_name.len().min(preface::NAME_MAX);
                let start = idx * preface::NAME_MAX;
                if let Some(slot) = self.names.get_mut(start..start + n) {
                    slot.copy_from_slice(&rec.server_name.as_bytes()[..n]);
                    if let Some(p) = self.pairs.get_mut(idx) {
                        p.sni_len = n as u8;
                    }
                }
            }
            if !ok {
                log::error!(
                    "worker {}: migrate: a moved pair's bytes do not fit the buffer; closing it",
                    self.id
                );
                self.close(idx, crate::outcome::CloseReason::Internal);
                continue;
            }
            if imp.app.cfg.idle_timeout.is_some() {
                self.idle_timeouts = true;
            }
            self.rec.record_migrated_in();
            // Relaying at once flushes held bytes and registers both halves with the interest
            // they need (`relay` ends with `set_interest`).
            self.relay(idx);
        }
        self.release_closed();
        self.rec.set_active(self.pairs.len());
    }

    /// A pair that found no slot: release what it holds and close it.
    fn drop_unadopted(&mut self, mut pair: Pair) {
        for flow in [&mut pair.to_upstream, &mut pair.to_client] {
            flow.buf.release(&mut self.pool, true);
        }
        if pair.source_counted
            && let Some(t) = &pair.app.sources
        {
            t.remove(pair.client_addr.ip());
        }
        self.rec
            .record_refused(&pair.app.counters, crate::outcome::CloseReason::Internal);
        pair.drop_upstream(&self.rec);
    }
}

/// How long a moved pair was stalled, for the log and the metrics.
pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}
