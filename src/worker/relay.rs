//! Relaying bytes between the halves of an established pair: each direction flushes what it
//! holds, then reads more only when its buffer is empty (so memory per pair is bounded by one
//! buffer per direction), until `WouldBlock`, EOF, an error, or the destination blocks
//! (backpressure: the source's readiness stays set and resumes on the destination's next
//! writable edge). EOF is forwarded as shutdown(Write) once flushed. With splice on, the
//! same loop moves bytes socket -> pipe -> socket in the kernel instead; a flow holds either a
//! buffer or a pipe with bytes, never both, so order is kept. No allocation.

use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::os::fd::AsRawFd;

use super::Worker;
use super::pair::{Flow, Half, PairState};
use super::token;
use crate::buffer::BufPool;
use crate::outcome::{CloseReason, Side};
use crate::sys::{self, Pipe};

impl Worker {
    /// Move whatever can move in both directions, then settle state and interest.
    pub(super) fn relay(&mut self, idx: usize) {
        let Some(pair) = self.pairs.get_mut(idx) else {
            return;
        };
        if pair.parked {
            return;
        }
        let down_done = pair.to_client.done();
        let up = pump(
            &mut pair.client,
            &mut pair.upstream,
            &mut pair.to_upstream,
            &mut self.pool,
            &mut self.pipes,
            (&mut pair.splice, &mut pair.splice_auto),
            Side::Client,
            down_done,
        );
        let up_done = pair.to_upstream.done();
        let down = match up {
            Ok(_) => pump(
                &mut pair.upstream,
                &mut pair.client,
                &mut pair.to_client,
                &mut self.pool,
                &mut self.pipes,
                (&mut pair.splice, &mut pair.splice_auto),
                Side::Upstream,
                up_done,
            ),
            Err(_) => Ok(0),
        };
        let (up_n, down_n) = (*up.as_ref().unwrap_or(&0), *down.as_ref().unwrap_or(&0));
        if up_n + down_n > 0 {
            self.rec.record_bytes(&pair.app.counters, up_n, down_n);
            pair.last_active = self.now;
        }
        if let Err(reason) = up.and(down) {
            self.close(idx, reason);
            return;
        }
        let next = match (pair.state, pair.to_upstream.done(), pair.to_client.done()) {
            (PairState::Open | PairState::HalfClosed, true, true) => None,
            (PairState::Open | PairState::HalfClosed, true, false)
            | (PairState::Open | PairState::HalfClosed, false, true) => Some(PairState::HalfClosed),
            (PairState::Open | PairState::HalfClosed, false, false) => Some(PairState::Open),
            (PairState::Preface | PairState::Connecting | PairState::Closed, _, _) => {
                log::error!("relay on a pair in state {:?}", pair.state);
                self.close(idx, CloseReason::Internal);
                return;
            }
        };
        match next {
            None => self.close(idx, CloseReason::Done),
            Some(state) => {
                pair.state = state;
                let registry = self.poll.registry();
                let want = pair.wanted_interest(Side::Client);
                Worker::set_interest(
                    registry,
                    &mut pair.client,
                    token::pair(idx, Side::Client),
                    want,
                );
                let want = pair.wanted_interest(Side::Upstream);
                Worker::set_interest(
                    registry,
                    &mut pair.upstream,
                    token::pair(idx, Side::Upstream),
                    want,
                );
            }
        }
    }
}

/// Pipes for the splice path: a per-worker free list plus a budget of live pipes (each costs
/// two file descriptors). When the budget is spent a flow simply uses its buffer instead.
pub struct PipePool {
    free: Vec<Pipe>,
    /// Pipes alive (free or held by flows).
    live: usize,
    budget: usize,
    /// How many more pipes may be enlarged to `PIPE_SIZE` (a share of the user's pipe-page
    /// allowance, see `control::big_pipes_per_worker`); the rest keep the default 64 KiB.
    big_left: usize,
    /// The allowance `big_left` started from (it never grows past it).
    big_max: usize,
}

/// Capacity asked of each new pipe while `big_left` lasts: one splice moves up to this much,
/// so a bulk direction costs a quarter of the system calls a default 64 KiB pipe needs.
pub const PIPE_SIZE: usize = 256 << 10;

/// Consecutive full-buffer reads after which a direction counts as bulk (`splice = "auto"`
/// then moves it to a pipe: up to `PIPE_SIZE` per system call instead of one buffer's worth).
pub const BULK_READS: u8 = 2;

/// Most bytes one splice call moves into a pipe (the pipe's capacity bounds it anyway).
const SPLICE_CHUNK: usize = 1 << 20;
/// Free pipes kept for reuse.
const PIPE_FREE_MAX: usize = 64;

impl PipePool {
    pub fn new(budget: usize, big: usize) -> PipePool {
        PipePool {
            free: Vec::with_capacity(PIPE_FREE_MAX.min(budget)),
            live: 0,
            budget,
            big_left: big,
            big_max: big,
        }
    }

    /// Grow a new pipe to `PIPE_SIZE` while the allowance lasts. A refusal (the user's pipe
    /// pages are spent, or a lower pipe-max-size) ends the attempts: the pipe stays default.
    fn enlarge(&mut self, p: &Pipe) {
        if self.big_left == 0 {
            return;
        }
        match sys::set_pipe_size(p, PIPE_SIZE) {
            Ok(_) => self.big_left -= 1,
            Err(e) => {
                log::debug!("F_SETPIPE_SZ {PIPE_SIZE}: {e}; pipes stay at the default size");
                self.big_left = 0;
            }
        }
    }

    /// Grow `p` (from this pool) to hold `len` bytes: a pair moved by an upgrade may bring more
    /// than a default pipe holds. Counted against the enlarge allowance like `enlarge`, even
    /// past it (the bytes must go somewhere); `close` gives it back.
    pub fn fit(&mut self, p: &Pipe, len: usize) -> bool {
        let have = sys::pipe_size(p).unwrap_or(0);
        if have >= len {
            return true;
        }
        match sys::set_pipe_size(p, len) {
            Ok(n) => {
                if n >= PIPE_SIZE && have < PIPE_SIZE {
                    self.big_left = self.big_left.saturating_sub(1);
                }
                n >= len
            }
            Err(_) => false,
        }
    }

    /// Close a pipe, giving its share of the enlarge allowance back.
    fn close(&mut self, pipe: Pipe) {
        self.live -= 1;
        if sys::pipe_size(&pipe).is_ok_and(|n| n >= PIPE_SIZE) {
            self.big_left = (self.big_left + 1).min(self.big_max);
        }
    }

    fn take(&mut self) -> Option<Pipe> {
        if let Some(p) = self.free.pop() {
            return Some(p);
        }
        if self.live >= self.budget {
            return None;
        }
        self.open()
            .map_err(|e| log::debug!("pipe: {e}; relaying through the buffer"))
            .ok()
    }

    /// A new pipe, counted live and grown while the allowance lasts.
    fn open(&mut self) -> io::Result<Pipe> {
        let p = sys::pipe()?;
        self.live += 1;
        self.enlarge(&p);
        Ok(p)
    }

    /// A pipe even beyond the budget (a pair moved here by an upgrade with bytes that were in
    /// a pipe: they must go back into one). Counted as live like any other.
    pub fn take_any(&mut self) -> Option<Pipe> {
        if let Some(p) = self.take() {
            return Some(p);
        }
        self.open().map_err(|e| log::warn!("pipe: {e}")).ok()
    }

    /// Return an empty pipe (or one whose bytes are abandoned: it is closed then).
    pub fn give(&mut self, pipe: Pipe, empty: bool) {
        if empty && self.free.len() < self.free.capacity() {
            self.free.push(pipe);
        } else {
            self.close(pipe);
        }
    }
}

/// Whether a splice error means "the kernel will not splice this" (fall back to buffers)
/// rather than a peer error.
fn splice_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EINVAL) | Some(libc::ENOSYS) | Some(libc::EOPNOTSUPP)
    )
}

/// Move bytes from `src` to `dst` through `flow` (its buffer, or its pipe when `splice` is
/// on). Returns the bytes written to `dst`, or why the pair must close. `other_done`: the
/// reverse direction has finished, so this EOF ends the pair and the close sends the FIN.
///
/// Readiness: besides `WouldBlock`, a short write (the socket's send buffer is full) and a
/// short read without a reported hang-up (the receive queue is empty) clear the sticky bit:
/// under edge triggering the next data, FIN, reset or free space raises a new edge, so the
/// extra syscall that would only return `WouldBlock` is saved.
#[allow(clippy::too_many_arguments)]
fn pump(
    src: &mut Half,
    dst: &mut Half,
    flow: &mut Flow,
    pool: &mut BufPool,
    pipes: &mut PipePool,
    (splice, auto): (&mut bool, &mut bool),
    src_side: Side,
    other_done: bool,
) -> Result<u64, CloseReason> {
    let dst_side = src_side.other();
    let mut moved = 0u64;
    let result = loop {
        // 1. Flush what this direction holds (buffer or pipe; never both).
        if flow.pending() > 0 {
            if !dst.writable {
                break Ok(());
            }
            let Some(sock) = dst.sock.as_mut() else {
                break Err(CloseReason::Internal);
            };
            let want = flow.pending();
            let res = match flow.pipe.as_ref() {
                Some(pipe) if flow.piped > 0 => {
                    sys::splice(pipe.r.as_raw_fd(), sock.as_raw_fd(), flow.piped)
                }
                _ => sock.write(flow.buf.data(pool)),
            };
            match res {
                Ok(0) => break Err(CloseReason::from_io(dst_side, io::ErrorKind::WriteZero)),
                Ok(n) => {
                    if n < want {
                        dst.writable = false;
                    }
                    if flow.piped > 0 {
                        flow.piped -= n;
                    } else {
                        flow.buf.consumed(n);
                    }
                    // A PROXY header epoxy wrote in front is not payload.
                    let header = n.min(usize::from(flow.header));
                    flow.header -= header as u16;
                    flow.written += (n - header) as u64;
                    moved += (n - header) as u64;
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dst.writable = false;
                    break Ok(());
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => break Err(CloseReason::from_io(dst_side, e.kind())),
            }
            continue;
        }
        // 2. Empty and the source has ended: forward the EOF once.
        if flow.eof {
            if !flow.shut {
                if !other_done && let Some(sock) = dst.sock.as_ref() {
                    // ENOTCONN here means the peer is already gone; the next read or write
                    // on that side reports it.
                    let _ = sock.shutdown(Shutdown::Write);
                }
                flow.shut = true;
            }
            break Ok(());
        }
        // 3. Empty: read more, into the pipe (splice) or the buffer.
        if !src.readable {
            break Ok(());
        }
        let Some(sock) = src.sock.as_mut() else {
            break Err(CloseReason::Internal);
        };
        // Always (`splice = true`), or while this direction is bulk (`"auto"`). The buffer is
        // empty here, so switching keeps the order of bytes.
        let want_pipe = *splice || (*auto && flow.bulk >= BULK_READS);
        if want_pipe && flow.pipe.is_none() {
            flow.pipe = pipes.take();
        }
        let via_pipe = want_pipe && flow.pipe.is_some();
        let mut room = SPLICE_CHUNK;
        let res = match flow.pipe.as_ref() {
            Some(pipe) if via_pipe => {
                sys::splice(sock.as_raw_fd(), pipe.w.as_raw_fd(), SPLICE_CHUNK)
            }
            _ => match flow.buf.space(pool) {
                Some(space) => {
                    room = space.len();
                    sock.read(space)
                }
                // Pool exhausted (cannot happen: it holds two buffers per pair slot). Leave
                // the readiness set; the next event retries.
                None => break Ok(()),
            },
        };
        match res {
            Ok(0) => flow.eof = true,
            Ok(n) => {
                if via_pipe {
                    flow.piped = n;
                    // Less than a buffer's worth: quiet again, back to the buffer.
                    if n < pool.buffer_size() {
                        flow.bulk = 0;
                    }
                } else {
                    flow.buf.filled(n);
                    if n < room {
                        flow.bulk = 0;
                        if !src.peer_closed {
                            src.readable = false;
                        }
                    } else {
                        flow.bulk = flow.bulk.saturating_add(1);
                    }
                }
                flow.read += n as u64;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                src.readable = false;
                break Ok(());
            }
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) if via_pipe && splice_unsupported(&e) => {
                log::debug!("splice refused ({e}); this pair falls back to buffers");
                *splice = false;
                *auto = false;
            }
            Err(e) => break Err(CloseReason::from_io(src_side, e.kind())),
        }
    };
    flow.buf.release(pool, false);
    if flow.piped == 0
        && let Some(p) = flow.pipe.take()
    {
        pipes.give(p, true);
    }
    result.map(|()| moved)
}
