//! A `Pair`: the client half, the upstream half, one flow per direction, and the explicit
//! state machine they move through. The vocabulary of endings (`CloseReason`, `ConnectFail`)
//! lives in `outcome.rs`. Never touches the poll or the slab: the worker drives it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::Interest;
use mio::net::TcpStream;

use crate::backend::AppRuntime;
use crate::buffer::Buffer;
use crate::outcome::Side;
use crate::stats::Recorder;

/// Where a pair is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairState {
    /// Client accepted; its first bytes (a PROXY header with `accept_proxy`, a TLS ClientHello
    /// with SNI routes) are being read into `to_upstream` before a target is chosen.
    Preface,
    /// A non-blocking connect to `Pair::target` is in flight.
    Connecting,
    /// Both halves established; bytes flow both ways.
    Open,
    /// One direction finished (EOF forwarded as shutdown(Write)); the other still flows.
    HalfClosed,
    /// Marked closed and queued; the slot is released after the current event batch.
    Closed,
}

impl PairState {
    pub fn as_str(self) -> &'static str {
        match self {
            PairState::Preface => "preface",
            PairState::Connecting => "connecting",
            PairState::Open => "open",
            PairState::HalfClosed => "half_closed",
            PairState::Closed => "closed",
        }
    }
}

/// One socket of a pair, with software-kept readiness.
/// Invariants: `readable`/`writable` are cleared by `WouldBlock`, or by a short read/write
/// that proves the socket drained/full (see `relay.rs`); `interest` is what is currently
/// registered with the poll (`None` = not registered, always so while `sock` is `None`).
#[derive(Debug, Default)]
pub struct Half {
    pub sock: Option<TcpStream>,
    pub readable: bool,
    pub writable: bool,
    pub interest: Option<Interest>,
    /// The peer's FIN (or an error) was reported (EPOLLRDHUP/ERR): read to the end, since no
    /// further edge will come for it.
    pub peer_closed: bool,
}

/// One direction of bytes (source half -> destination half).
/// Invariants: `written <= read`; `shut` implies `eof` and an empty buffer.
#[derive(Debug, Default)]
pub struct Flow {
    pub buf: Buffer,
    /// The source sent EOF; nothing more will be read.
    pub eof: bool,
    /// shutdown(Write) was sent to the destination.
    pub shut: bool,
    pub read: u64,
    pub written: u64,
    /// The kernel pipe of the splice path, held only while bytes are in it.
    pub pipe: Option<crate::sys::Pipe>,
    /// Bytes sitting in `pipe`. Invariant: only one of `buf` and `pipe` holds bytes.
    pub piped: usize,
    /// The first `header` pending bytes of `buf` are a PROXY header written by epoxy, not
    /// payload: they count toward neither `read` nor `written`.
    pub header: u16,
    /// Consecutive reads that filled the buffer (or a pipe read of at least a buffer's
    /// worth): at `relay::BULK_READS` the direction is bulk and, with `splice = "auto"`,
    /// reads into a pipe; a short read resets it (back to the buffer).
    pub bulk: u8,
}

impl Flow {
    /// Bytes read from the source and not yet written to the destination.
    #[inline]
    pub fn pending(&self) -> usize {
        self.buf.pending() + self.piped
    }

    /// EOF seen and forwarded: this direction is over.
    pub fn done(&self) -> bool {
        self.shut
    }
}

/// Most connect attempts per pair (failover candidates kept inline, no allocation).
pub const MAX_ATTEMPTS: usize = 16;

/// A client connection and its upstream connection.
pub struct Pair {
    pub state: PairState,
    pub client: Half,
    pub upstream: Half,
    /// Bytes from the client to the upstream.
    pub to_upstream: Flow,
    /// Bytes from the upstream to the client.
    pub to_client: Flow,
    /// The app (of the config generation that accepted it; a reload does not change it).
    pub app: Arc<AppRuntime>,
    /// Index of `app` in the worker's apps when accepted (checked with `Arc::ptr_eq` before
    /// use: a reload may have replaced the generation).
    pub app_idx: u32,
    /// The pair counts toward `app.sources` for `client_addr.ip()`.
    pub source_counted: bool,
    /// Length of the TLS server name kept in the worker's name table for this slot.
    pub sni_len: u8,
    /// Index of the target being tried or in use, within the app. While `upstream.sock` is
    /// `Some`, the pair counts toward that target's live pairs (see `drop_upstream`).
    pub target: u16,
    /// Ordered failover candidates (`candidates[..n_candidates]`); `attempt` indexes the one
    /// being tried. Invariant: `attempt <= n_candidates <= MAX_ATTEMPTS`.
    pub candidates: [u16; MAX_ATTEMPTS],
    pub n_candidates: u8,
    pub attempt: u8,
    /// The client: the peer address, or the source of its PROXY header (`accept_proxy`).
    pub client_addr: SocketAddr,
    pub started: Instant,
    /// When the preface or the connect in flight times out.
    pub deadline: Instant,
    pub connect_started: Instant,
    /// Time the successful connect took, in microseconds (zero until connected; saturates
    /// at about 71 minutes). A u32, not a `Duration`: 12 bytes less on every pair.
    connect_us: u32,
    pub last_active: Instant,
    /// Relay with splice(2) (turned off for good if the kernel refuses it for this pair).
    pub splice: bool,
    /// `splice = "auto"`: a direction relays through a pipe while it is bulk (see
    /// `Flow::bulk`); turned off for good if the kernel refuses splice for this pair.
    pub splice_auto: bool,
    /// The upstream socket could not be created for lack of file descriptors: the connect is
    /// retried by the timer until `deadline` (not the target's fault; health is untouched).
    pub waiting_fd: bool,
    /// Being moved to a new process (upgrade): deregistered; no event, timer or relay touches
    /// it until the move is settled (see `migrate.rs`).
    pub parked: bool,
}

impl Pair {
    /// Time the successful connect took (zero until connected).
    pub fn connect_time(&self) -> Duration {
        Duration::from_micros(u64::from(self.connect_us))
    }

    pub fn set_connect_time(&mut self, d: Duration) {
        self.connect_us = u32::try_from(d.as_micros()).unwrap_or(u32::MAX);
    }

    pub fn new(
        client: TcpStream,
        client_addr: SocketAddr,
        app: Arc<AppRuntime>,
        app_idx: usize,
        now: Instant,
    ) -> Pair {
        Pair {
            state: PairState::Connecting,
            app_idx: app_idx as u32,
            source_counted: false,
            sni_len: 0,
            // A just-accepted socket has an empty send buffer: writable until a write says
            // otherwise (saves two epoll_ctl calls and a wake-up per connection).
            client: Half {
                sock: Some(client),
                readable: false,
                writable: true,
                interest: None,
                peer_closed: false,
            },
            upstream: Half::default(),
            to_upstream: Flow::default(),
            to_client: Flow::default(),
            app,
            target: 0,
            candidates: [0; MAX_ATTEMPTS],
            n_candidates: 0,
            attempt: 0,
            client_addr,
            started: now,
            deadline: now,
            connect_started: now,
            connect_us: 0,
            last_active: now,
            splice: false,
            splice_auto: false,
            waiting_fd: false,
            parked: false,
        }
    }

    pub fn half(&mut self, side: Side) -> &mut Half {
        match side {
            Side::Client => &mut self.client,
            Side::Upstream => &mut self.upstream,
        }
    }

    /// The interest a half needs now: READABLE always (errors and resets arrive as read
    /// events, and under edge triggering an unread socket costs nothing), WRITABLE only while
    /// bytes for it wait and the last write hit `WouldBlock`, or while its connect is in flight.
    pub fn wanted_interest(&self, side: Side) -> Interest {
        if side == Side::Upstream && self.state == PairState::Connecting {
            return Interest::READABLE | Interest::WRITABLE;
        }
        let (half, inbound) = match side {
            Side::Client => (&self.client, &self.to_client),
            Side::Upstream => (&self.upstream, &self.to_upstream),
        };
        if inbound.pending() > 0 && !half.writable {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        }
    }

    /// Install the socket of a connect attempt to `self.target`; the pair now counts toward
    /// that target's live pairs.
    pub fn set_upstream(&mut self, sock: TcpStream, rec: &Recorder) {
        self.drop_upstream(rec);
        if let Some(t) = self.app.targets.get(usize::from(self.target)) {
            rec.record_target_claim(&t.counters);
        }
        self.upstream = Half {
            sock: Some(sock),
            ..Half::default()
        };
    }

    /// Close the upstream socket (if any) and stop counting toward its target: the only place
    /// a target's live-pair count goes down. Closing the fd removes it from the epoll set, so
    /// no `epoll_ctl(DEL)` is spent.
    pub fn drop_upstream(&mut self, rec: &Recorder) {
        if self.upstream.sock.take().is_some()
            && let Some(t) = self.app.targets.get(usize::from(self.target))
        {
            rec.record_target_release(&t.counters);
        }
        self.upstream.interest = None;
    }

    /// Bytes were read from a side and never delivered to the other.
    pub fn truncated(&self) -> bool {
        self.to_upstream.read != self.to_upstream.written
            || self.to_client.read != self.to_client.written
    }
}

#[cfg(test)]
mod tests {
    /// A pair's slab entry is most of an idle pair's memory (issue 12: at most 0.3 KiB of RSS
    /// per idle pair, measured by `bench/run.sh` phase f). Growing `Pair` past this needs the
    /// benchmark rerun, not a new number here.
    #[test]
    fn pair_stays_small() {
        let size = std::mem::size_of::<super::Pair>();
        assert!(size <= 288, "Pair is {size} bytes");
    }
}
