//! The vocabulary of endings, shared by the data plane, the counters and the renderers: which
//! side of a pair a socket is (`Side`), why a pair closed (`CloseReason`), why one connect
//! attempt failed (`ConnectFail`) and why accepting paused (`PauseCause`). Each enum is small
//! and `Copy` (used on the hot path), carries its table (`COUNT`, `ALL` in discriminant order,
//! so `x as usize` indexes counter arrays) and its label (`as_str`, used in metrics, logs and
//! the summary). This module depends on nothing else in the crate and must never grow state.

use std::io::ErrorKind;

/// Which half of a pair a socket is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    Client = 0,
    Upstream = 1,
}

impl Side {
    pub fn other(self) -> Side {
        match self {
            Side::Client => Side::Upstream,
            Side::Upstream => Side::Client,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Side::Client => "client",
            Side::Upstream => "upstream",
        }
    }
}

/// Why a pair closed.
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
    /// `accept_proxy`: the client's PROXY header was malformed, missing or late.
    ProxyHeader,
    /// The client's address is denied (or not allowed) by the app's ACL.
    AclDenied,
    /// The client's address already has `max_conns_per_source` live pairs.
    SourceLimit,
    /// `sni_required`: the client's first bytes were not a TLS ClientHello with a server name.
    SniRequired,
}

impl CloseReason {
    pub const COUNT: usize = 13;
    pub const ALL: [CloseReason; CloseReason::COUNT] = [
        CloseReason::Done,
        CloseReason::ClientReset,
        CloseReason::UpstreamReset,
        CloseReason::ClientError,
        CloseReason::UpstreamError,
        CloseReason::NoBackend,
        CloseReason::IdleTimeout,
        CloseReason::Shutdown,
        CloseReason::Internal,
        CloseReason::ProxyHeader,
        CloseReason::AclDenied,
        CloseReason::SourceLimit,
        CloseReason::SniRequired,
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
            CloseReason::ProxyHeader => "proxy_header",
            CloseReason::AclDenied => "acl_denied",
            CloseReason::SourceLimit => "source_limit",
            CloseReason::SniRequired => "sni_required",
        }
    }

    /// The side that caused the close, if one did.
    pub fn side(self) -> Option<Side> {
        match self {
            CloseReason::ClientReset
            | CloseReason::ClientError
            | CloseReason::ProxyHeader
            | CloseReason::AclDenied
            | CloseReason::SourceLimit
            | CloseReason::SniRequired => Some(Side::Client),
            CloseReason::UpstreamReset | CloseReason::UpstreamError | CloseReason::NoBackend => {
                Some(Side::Upstream)
            }
            CloseReason::Done
            | CloseReason::IdleTimeout
            | CloseReason::Shutdown
            | CloseReason::Internal => None,
        }
    }

    /// The side whose socket is closed with a reset (SO_LINGER 0) rather than a FIN: the peer
    /// of a side that reset or failed, so a truncated stream never looks complete to it.
    /// Refusals (`NoBackend`, `ProxyHeader`, `AclDenied`, ...) abort nothing: no upstream
    /// carried bytes, and the client gets a plain close.
    pub fn aborts(self) -> Option<Side> {
        match self {
            CloseReason::ClientReset | CloseReason::ClientError => Some(Side::Upstream),
            CloseReason::UpstreamReset | CloseReason::UpstreamError => Some(Side::Client),
            CloseReason::Done
            | CloseReason::NoBackend
            | CloseReason::IdleTimeout
            | CloseReason::Shutdown
            | CloseReason::Internal
            | CloseReason::ProxyHeader
            | CloseReason::AclDenied
            | CloseReason::SourceLimit
            | CloseReason::SniRequired => None,
        }
    }

    /// Classify an I/O error on `side`.
    pub fn from_io(side: Side, kind: ErrorKind) -> CloseReason {
        let reset = matches!(
            kind,
            ErrorKind::ConnectionReset | ErrorKind::ConnectionAborted | ErrorKind::BrokenPipe
        );
        match (side, reset) {
            (Side::Client, true) => CloseReason::ClientReset,
            (Side::Client, false) => CloseReason::ClientError,
            (Side::Upstream, true) => CloseReason::UpstreamReset,
            (Side::Upstream, false) => CloseReason::UpstreamError,
        }
    }
}

/// Why one upstream connect attempt failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectFail {
    Refused,
    Timeout,
    Other,
}

impl ConnectFail {
    pub const COUNT: usize = 3;
    pub const ALL: [ConnectFail; ConnectFail::COUNT] = [
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

    pub fn from_io(kind: ErrorKind) -> ConnectFail {
        match kind {
            ErrorKind::ConnectionRefused => ConnectFail::Refused,
            ErrorKind::TimedOut => ConnectFail::Timeout,
            _ => ConnectFail::Other,
        }
    }
}

/// Why accepting was paused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PauseCause {
    /// Global or per-app `max_conns` reached.
    Limit,
    /// The process or system ran out of file descriptors or socket memory
    /// (EMFILE/ENFILE/ENOBUFS/ENOMEM).
    Emfile,
}

impl PauseCause {
    pub const COUNT: usize = 2;
    pub const ALL: [PauseCause; PauseCause::COUNT] = [PauseCause::Limit, PauseCause::Emfile];

    pub fn as_str(self) -> &'static str {
        match self {
            PauseCause::Limit => "limit",
            PauseCause::Emfile => "emfile",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `ALL[i] as usize == i` and labels are unique and non-empty: counter arrays are indexed
    /// by discriminant and rendered by walking `ALL`.
    fn check_table<T: Copy>(
        all: &[T],
        index: impl Fn(T) -> usize,
        label: impl Fn(T) -> &'static str,
    ) {
        let mut seen = std::collections::HashSet::new();
        for (i, &v) in all.iter().enumerate() {
            assert_eq!(index(v), i, "ALL out of discriminant order at {i}");
            let l = label(v);
            assert!(!l.is_empty() && l.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'));
            assert!(seen.insert(l), "duplicate label {l}");
        }
    }

    #[test]
    fn tables_are_in_order() {
        check_table(&CloseReason::ALL, |r| r as usize, CloseReason::as_str);
        check_table(&ConnectFail::ALL, |r| r as usize, ConnectFail::as_str);
        check_table(&PauseCause::ALL, |r| r as usize, PauseCause::as_str);
        check_table(
            &[Side::Client, Side::Upstream],
            |s| s as usize,
            Side::as_str,
        );
    }

    #[test]
    fn resets_abort_the_other_side() {
        assert_eq!(CloseReason::ClientReset.aborts(), Some(Side::Upstream));
        assert_eq!(CloseReason::ClientError.aborts(), Some(Side::Upstream));
        assert_eq!(CloseReason::UpstreamReset.aborts(), Some(Side::Client));
        assert_eq!(CloseReason::UpstreamError.aborts(), Some(Side::Client));
        for r in [
            CloseReason::Done,
            CloseReason::NoBackend,
            CloseReason::IdleTimeout,
            CloseReason::Shutdown,
            CloseReason::Internal,
            CloseReason::ProxyHeader,
            CloseReason::AclDenied,
            CloseReason::SourceLimit,
            CloseReason::SniRequired,
        ] {
            assert_eq!(r.aborts(), None, "{r:?}");
        }
        assert_eq!(
            CloseReason::from_io(Side::Upstream, ErrorKind::BrokenPipe),
            CloseReason::UpstreamReset
        );
        assert_eq!(
            CloseReason::from_io(Side::Client, ErrorKind::Other),
            CloseReason::ClientError
        );
    }
}
