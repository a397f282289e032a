//! A `Pair`: the client half, the upstream half, one buffer per direction, and the explicit
//! state machine they move through. Owns the vocabulary of why pairs close (`CloseReason`) and
//! why connects fail (`ConnectFail`). Never touches the poll or the slab: the worker drives it.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mio::Interest;
use mio::net::TcpStream;

use super::token::Side;
use crate::backend::AppRuntime;
use crate::buffer::Buffer;

/// Why a pair closed. Small and `Copy`: used on the hot path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CloseReason {
    /// Both directions finished with EOF and were flushed.
    Done,
    ClientReset,
    UpstreamReset,
    ClientError,
    UpstreamError,
    /// Every candidate target failed to connect.
    NoBackend,
    IdleTimeout,
    /// Still open when the grace period ended (or on immediate shutdown).
    Shutdown,
    /// An impossible state was reached; logged and counted.
    Internal,
}

impl CloseReason {
    pub const COUNT: usize = 9;
    pub const ALL: [CloseReason; 9] = [
        CloseReason::Done,
        CloseReason::ClientReset,
        CloseReason::UpstreamReset,
        CloseReason::ClientError,
        CloseReason::UpstreamError,
        CloseReason::NoBackend,
        CloseReason::IdleTimeout,
        CloseReason::Shutdown,
        CloseReason::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            CloseReason::Done => "done",
            CloseReason::ClientReset => "client_reset",
            CloseReason::UpstreamReset => "upstream_reset",
            CloseReason::ClientError => "client_error",
            CloseReason::UpstreamError => "upstream_error",
            CloseReason::NoBackend => "no_backend",
            CloseReason::IdleTimeout => "idle_timeout",
            CloseReason::Shutdown => "shutdown",
            CloseReason::Internal => "internal",
        }
    }

    /// The side that caused the close, if one did.
    pub fn side(self) -> Option<Side> {
        match self {
            CloseReason::ClientReset | CloseReason::ClientError => Some(Side::Client),
            CloseReason::UpstreamReset | CloseReason::UpstreamError | CloseReason::NoBackend => {
                Some(Side::Upstream)
            }
            CloseReason::Done
            | CloseReason::IdleTimeout
            | CloseReason::Shutdown
            | CloseReason::Internal => None,
        }
    }

    /// Classify an I/O error on `side`.
    pub fn from_io(side: Side, kind: std::io::ErrorKind) -> CloseReason {
        use std::io::ErrorKind as K;
        let reset = matches!(
            kind,
            K::ConnectionReset | K::ConnectionAborted | K::BrokenPipe
        );
        match (side, reset) {
            (Side::Client, true) => CloseReason::ClientReset,
            (Side::Client, false) => CloseReason::ClientError,
            (Side::Upstream, true) => CloseReason::UpstreamReset,
            (Side::Upstream, false) => CloseReason::UpstreamError,
        }
    }
}

/// Why one connect attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFail {
    Refused,
    Timeout,
    Other,
}

impl ConnectFail {
    pub const COUNT: usize = 3;
    pub const ALL: [ConnectFail; 3] = [
        ConnectFail::Refused,
        ConnectFail::Timeout,
        ConnectFail::Other,
    ];
    pub fn as_str(self) -> &'static str {
        match self {
            ConnectFail::Refused => "refused",
            ConnectFail::Timeout => "timeout",
            ConnectFail::Other => "other",
        }
    }
    pub fn from_io(kind: std::io::ErrorKind) -> ConnectFail {
        match kind {
            std::io::ErrorKind::ConnectionRefused => ConnectFail::Refused,
            std::io::ErrorKind::TimedOut => ConnectFail::Timeout,
            _ => ConnectFail::Other,
        }
    }
}

/// Where a pair is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PairState {
    /// Client accepted; a non-blocking connect to `Pair::target` is in flight.
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
/// registered with the poll (`None` = not).
#[derive(Debug, Default)]
pub struct Half {
    pub sock: Option<TcpStream>,
    pub readable: bool,
    pub writable: bool,
    pub interest: Option<Interest>,
    /// The peer's FIN (or an error) was reported (EPOLLRDHUP/ERR): read to the end, since no
    /// further edge will come for it.
    pub hup: bool,
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
    /// client -> upstream
    pub up: Flow,
    /// upstream -> client
    pub down: Flow,
    /// The app (of the config generation that accepted it; a reload does not change it).
    pub app: Arc<AppRuntime>,
    /// Index of the target being tried or in use, within the app.
    pub target: usize,
    /// Ordered candidates (`cand[..ncand]`); `attempt` indexes the one being tried.
    pub cand: [u16; MAX_ATTEMPTS],
    pub ncand: u8,
    pub attempt: u8,
    pub client_addr: SocketAddr,
    pub started: Instant,
    /// When the connect in flight times out.
    pub deadline: Instant,
    pub connect_started: Instant,
    /// Time the successful connect took (zero until connected).
    pub connect_time: Duration,
    pub last_active: Instant,
    /// Whether this pair holds the target's active-count slot.
    pub target_counted: bool,
    pub reason: CloseReason,
    /// Relay with splice(2) (turned off for good if the kernel refuses it for this pair).
    pub splice: bool,
    /// The upstream socket could not be created for lack of file descriptors: the connect is
    /// retried by the timer until `deadline` (not the target's fault; health is untouched).
    pub waiting_fd: bool,
}

impl Pair {
    pub fn new(
        client: TcpStream,
        client_addr: SocketAddr,
        app: Arc<AppRuntime>,
        now: Instant,
    ) -> Pair {
        Pair {
            state: PairState::Connecting,
            // A just-accepted socket has an empty send buffer: writable until a write says
            // otherwise (saves two epoll_ctl calls and a wake-up per connection).
            client: Half {
                sock: Some(client),
                readable: false,
                writable: true,
                interest: None,
                hup: false,
            },
            upstream: Half::default(),
            up: Flow::default(),
            down: Flow::default(),
            app,
            target: 0,
            cand: [0; MAX_ATTEMPTS],
            ncand: 0,
            attempt: 0,
            client_addr,
            started: now,
            deadline: now,
            connect_started: now,
            connect_time: Duration::ZERO,
            last_active: now,
            target_counted: false,
            reason: CloseReason::Internal,
            splice: false,
            waiting_fd: false,
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
            Side::Client => (&self.client, &self.down),
            Side::Upstream => (&self.upstream, &self.up),
        };
        if inbound.pending() > 0 && !half.writable {
            Interest::READABLE | Interest::WRITABLE
        } else {
            Interest::READABLE
        }
    }
}
