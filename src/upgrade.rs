//! Zero-downtime binary upgrade (SIGUSR2) and the other ways listening sockets reach a
//! process from outside: the hand-over channel between an old and a new process, systemd
//! socket activation (`LISTEN_FDS`) and readiness notification (`NOTIFY_SOCKET`).
//!
//! The hand-over, old process (O) and new process (N), over a Unix stream socket pair whose
//! N end is passed as descriptor `EPOXY_UPGRADE_FD`:
//! 1. O starts N from O's binary path (as it was at start: the file may have been replaced)
//!    with O's arguments and environment, and sends `Sockets` frames: every listening socket
//!    (per worker) and the admin socket, as SCM_RIGHTS descriptors. N never rebinds them.
//! 2. N loads its configuration, binds only what it did not receive, starts workers and
//!    health checks **without accepting**, and sends `Ready` (or `Failed` with the reason).
//! 3. O answers `Go`, stops accepting (closing its copies leaves the sockets open: N holds
//!    them) and drains its live pairs within `grace_period`. N, on `Go`, tells systemd its
//!    PID and readiness, writes the PID file and starts accepting.
//! 4. O sends its counter totals (`Counters`) at once and the rest at exit, so dashboards see
//!    no reset. End of stream ends the channel.
//!
//! If N fails before `Ready` (bad config, crash, missing binary, fd limit, 30 s timeout), O
//! keeps serving, logs why in one line and counts it. N accepts nothing before `Go`, so
//! killing it then loses nothing. End of stream before `Go` makes N exit (status 1).
//!
//! Frames are a 4-byte big-endian length and a JSON object with a `type`, decoded strictly
//! (unknown types, oversize frames and descriptor counts that disagree are errors).

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener};
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{self, Receiver};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::admin::ProxyView;
use crate::error::Error;
use crate::migrate::PairRecord;
use crate::outcome::{CloseReason, ConnectFail, PauseCause};
use crate::sys;
use crate::worker::ListenKey;
use crate::worker::migrate::{Export, Import};

/// The environment variable that names the new process's end of the channel.
pub const ENV_FD: &str = "EPOXY_UPGRADE_FD";
/// Test hook: the new process waits this many milliseconds before it says `Ready`.
pub const ENV_TEST_HOLD_MS: &str = "EPOXY_UPGRADE_TEST_HOLD_MS";
/// Test hook: the new process waits this many milliseconds before answering a batch of
/// moved pairs.
pub const ENV_TEST_MIGRATE_HOLD_MS: &str = "EPOXY_MIGRATE_TEST_HOLD_MS";
/// Test hook, like the one above: the new process waits this long before serving a committed
/// batch (a new process slow to read its channel).
pub const ENV_TEST_COMMIT_HOLD_MS: &str = "EPOXY_MIGRATE_TEST_COMMIT_HOLD_MS";
/// The test hooks above: sleep as long as `var` says (unset: not at all), and log it.
fn test_hold(var: &str, before: &str) {
    if let Some(ms) = std::env::var(var).ok().and_then(|v| v.parse::<u64>().ok()) {
        log::info!("upgrade: test hold of {ms} ms before {before}");
        std::thread::sleep(Duration::from_millis(ms));
    }
}

/// How long the old process waits for the new one to say `Ready`.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the new process waits for the sockets, and for `Go` after `Ready`.
const PEER_TIMEOUT: Duration = Duration::from_secs(30);
/// How long an old process waits, at exit, for the new one to read the last frames.
pub const FINISH_PATIENCE: Duration = Duration::from_secs(2);
/// Version of the channel's frames.
const VERSION: u32 = 1;
/// Largest frame accepted.
const MAX_FRAME: usize = 4 << 20;

/// What a socket handed over is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SocketKind {
    Listen,
    Admin,
}

/// One socket handed over: which listener of the config it is (the address as configured,
/// port 0 included, and how many equal addresses precede it) and the worker that held it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SocketEntry {
    pub kind: SocketKind,
    pub addr: SocketAddr,
    pub nth: usize,
    pub worker: usize,
}

#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case", deny_unknown_fields)]
enum Frame {
    /// O -> N: sockets; the descriptors ride on this frame, in `entries` order.
    Sockets {
        version: u32,
        entries: Vec<SocketEntry>,
        more: bool,
    },
    /// N -> O: started, not accepting yet.
    Ready { pid: u32 },
    /// N -> O: could not start (N exits next).
    Failed { pid: u32, reason: String },
    /// O -> N: take over.
    Go {},
    /// O -> N: totals to add to N's counters.
    Counters { totals: Box<Totals> },
    /// O -> N: `count` parked pairs; two descriptors each (client, upstream) ride on this
    /// frame; `len` bytes of records follow it (each a u32 length and a `PairRecord`).
    Pairs {
        batch: u64,
        count: u32,
        len: u32,
        #[serde(skip)]
        blob: Vec<u8>,
    },
    /// N -> O: which pairs of `batch` N can take (checked, slots reserved).
    Taken { batch: u64, taken: Vec<bool> },
    /// O -> N: the taken pairs of `batch` are N's now (O dropped them): serve them.
    /// `stall_us`: how long they were parked.
    Commit { batch: u64, stall_us: u64 },
    /// O -> N: O keeps every pair of `batch`.
    Abort { batch: u64 },
}

fn encode(frame: &Frame) -> io::Result<Vec<u8>> {
    let body = serde_json::to_vec(frame).map_err(io::Error::other)?;
    let len = u32::try_from(body.len()).map_err(io::Error::other)?;
    let mut out = Vec::with_capacity(4 + body.len());
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(&body);
    Ok(out)
}

fn write_frame(sock: &UnixStream, frame: &Frame, fds: &[BorrowedFd<'_>]) -> io::Result<()> {
    let bytes = encode(frame)?;
    let sent = if fds.is_empty() {
        0
    } else {
        sys::send_with_fds(sock, &bytes, fds)?
    };
    let mut w = sock;
    w.write_all(&bytes[sent..])?;
    if let Frame::Pairs { blob, .. } = frame {
        w.write_all(blob)?;
    }
    Ok(())
}

/// Read exactly `buf.len()` bytes (collecting descriptors); `Ok(false)`: end of stream before
/// the first byte.
fn read_full(sock: &UnixStream, buf: &mut [u8], fds: &mut Vec<OwnedFd>) -> io::Result<bool> {
    let mut got = 0;
    while got < buf.len() {
        let n = sys::recv_with_fds(sock, &mut buf[got..], fds)?;
        if n == 0 {
            if got == 0 {
                return Ok(false);
            }
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the channel closed in the middle of a frame",
            ));
        }
        got += n;
    }
    Ok(true)
}

/// The next frame, or `None` at end of stream.
fn read_frame(sock: &UnixStream, fds: &mut Vec<OwnedFd>) -> io::Result<Option<Frame>> {
    let mut len = [0u8; 4];
    if !read_full(sock, &mut len, fds)? {
        return Ok(None);
    }
    let len = u32::from_be_bytes(len) as usize;
    if len == 0 || len > MAX_FRAME {
        return Err(invalid(format!("frame of {len} bytes")));
    }
    let mut body = vec![0u8; len];
    if !read_full(sock, &mut body, fds)? {
        return Err(invalid(
            "the channel closed in the middle of a frame".into(),
        ));
    }
    let mut frame = decode(&body)?;
    if let Frame::Pairs { len, blob, .. } = &mut frame {
        let len = *len as usize;
        if len > MAX_FRAME * 16 {
            return Err(invalid(format!("pair records of {len} bytes")));
        }
        blob.resize(len, 0);
        if len > 0 && !read_full(sock, blob, fds)? {
            return Err(invalid(
                "the channel closed in the middle of pair records".into(),
            ));
        }
    }
    Ok(Some(frame))
}

/// Split a `Pairs` blob into exactly `count` records (each decoded strictly on its own; a
/// bad record is `Err` in its place, a bad framing fails the whole batch).
pub fn split_records(
    blob: &[u8],
    count: usize,
) -> io::Result<Vec<Result<PairRecord, crate::migrate::RecordError>>> {
    let mut out = Vec::with_capacity(count.min(1024));
    let mut at = 0usize;
    for _ in 0..count {
        let head = blob
            .get(at..at.saturating_add(4))
            .ok_or_else(|| invalid("pair records truncated".into()))?;
        let n = u32::from_be_bytes([head[0], head[1], head[2], head[3]]) as usize;
        at += 4;
        let rec = blob
            .get(at..at.saturating_add(n))
            .ok_or_else(|| invalid("pair records truncated".into()))?;
        at += n;
        out.push(PairRecord::decode(rec));
    }
    if at != blob.len() {
        return Err(invalid("bytes after the last pair record".into()));
    }
    Ok(out)
}

/// Decode one frame body (strict: unknown types and fields are errors).
fn decode(body: &[u8]) -> io::Result<Frame> {
    serde_json::from_slice(body).map_err(|e| invalid(format!("bad frame: {e}")))
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

// ---------------------------------------------------------------------------------------
// Counter totals carried from the old process to the new one.

/// The totals operators graph, by label (not by index, so a newer binary with more close
/// reasons still reads an older one's): what a new process adds to its own counters.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Totals {
    pub accepted: u64,
    pub bytes_to_upstream: u64,
    pub bytes_to_client: u64,
    pub access_log_dropped: u64,
    pub closed: BTreeMap<String, u64>,
    pub connect_fail: BTreeMap<String, u64>,
    pub accept_pauses: BTreeMap<String, u64>,
    /// Accepted connections per worker index.
    pub per_worker_accepted: Vec<u64>,
    pub reloads_success: u64,
    pub reloads_failure: u64,
    pub upgrades_success: u64,
    pub upgrades_failure: u64,
    pub apps: BTreeMap<String, AppTotals>,
}

/// One app's totals; targets map to their connect errors by reason.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AppTotals {
    pub total: u64,
    pub bytes_to_upstream: u64,
    pub bytes_to_client: u64,
    pub closed: BTreeMap<String, u64>,
    pub truncated: BTreeMap<String, u64>,
    pub targets: BTreeMap<String, BTreeMap<String, u64>>,
}

fn labelled<const N: usize>(labels: [&'static str; N], values: [u64; N]) -> BTreeMap<String, u64> {
    labels
        .iter()
        .zip(values)
        .filter(|(_, v)| *v > 0)
        .map(|(l, v)| (l.to_string(), v))
        .collect()
}

fn minus_map(a: &BTreeMap<String, u64>, b: &BTreeMap<String, u64>) -> BTreeMap<String, u64> {
    a.iter()
        .map(|(k, v)| (k.clone(), v.saturating_sub(b.get(k).copied().unwrap_or(0))))
        .filter(|(_, v)| *v > 0)
        .collect()
}

fn close_labels() -> [&'static str; CloseReason::COUNT] {
    CloseReason::ALL.map(CloseReason::as_str)
}

impl Totals {
    /// The current totals of `view` (its own counters and what it carried in).
    pub fn take(view: &ProxyView) -> Totals {
        let s = view.summary();
        let per_worker_accepted = (0..view.workers.len())
            .map(|i| view.worker_accepted(i))
            .collect();
        let apps = view
            .apps()
            .iter()
            .map(|a| {
                let c = &a.counters;
                let load = |x: &[std::sync::atomic::AtomicU64; CloseReason::COUNT]| {
                    std::array::from_fn(|i| x[i].load(Relaxed))
                };
                let targets = a
                    .targets
                    .iter()
                    .map(|t| {
                        let errs =
                            std::array::from_fn(|i| t.counters.connect_errors[i].load(Relaxed));
                        (
                            t.cfg.name.clone(),
                            labelled(ConnectFail::ALL.map(ConnectFail::as_str), errs),
                        )
                    })
                    .collect();
                let totals = AppTotals {
                    total: c.total.load(Relaxed),
                    bytes_to_upstream: c.bytes_to_upstream(),
                    bytes_to_client: c.bytes_to_client(),
                    closed: labelled(close_labels(), load(&c.closed)),
                    truncated: labelled(close_labels(), load(&c.truncated)),
                    targets,
                };
                (a.cfg.name.clone(), totals)
            })
            .collect();
        Totals {
            accepted: s.accepted,
            bytes_to_upstream: s.bytes_client_to_upstream,
            bytes_to_client: s.bytes_upstream_to_client,
            access_log_dropped: s.access_log_dropped,
            closed: labelled(close_labels(), s.closed),
            connect_fail: labelled(ConnectFail::ALL.map(ConnectFail::as_str), s.connect_fail),
            accept_pauses: labelled(PauseCause::ALL.map(PauseCause::as_str), s.accept_pauses),
            per_worker_accepted,
            reloads_success: view.reloads.success.load(Relaxed),
            reloads_failure: view.reloads.failure.load(Relaxed),
            upgrades_success: view.upgrades.success.load(Relaxed),
            upgrades_failure: view.upgrades.failure.load(Relaxed),
            apps,
        }
    }

    /// What grew from `earlier` to `self` (counters only grow; a shrink counts as 0).
    pub fn minus(&self, earlier: &Totals) -> Totals {
        let apps = self
            .apps
            .iter()
            .map(|(name, a)| {
                let e = earlier.apps.get(name).cloned().unwrap_or_default();
                let targets = a
                    .targets
                    .iter()
                    .map(|(t, errs)| {
                        let empty = BTreeMap::new();
                        (
                            t.clone(),
                            minus_map(errs, e.targets.get(t).unwrap_or(&empty)),
                        )
                    })
                    .collect();
                let d = AppTotals {
                    total: a.total.saturating_sub(e.total),
                    bytes_to_upstream: a.bytes_to_upstream.saturating_sub(e.bytes_to_upstream),
                    bytes_to_client: a.bytes_to_client.saturating_sub(e.bytes_to_client),
                    closed: minus_map(&a.closed, &e.closed),
                    truncated: minus_map(&a.truncated, &e.truncated),
                    targets,
                };
                (name.clone(), d)
            })
            .collect();
        let per_worker_accepted = self
            .per_worker_accepted
            .iter()
            .enumerate()
            .map(|(i, v)| {
                v.saturating_sub(earlier.per_worker_accepted.get(i).copied().unwrap_or(0))
            })
            .collect();
        Totals {
            accepted: self.accepted.saturating_sub(earlier.accepted),
            bytes_to_upstream: self
                .bytes_to_upstream
                .saturating_sub(earlier.bytes_to_upstream),
            bytes_to_client: self.bytes_to_client.saturating_sub(earlier.bytes_to_client),
            access_log_dropped: self
                .access_log_dropped
                .saturating_sub(earlier.access_log_dropped),
            closed: minus_map(&self.closed, &earlier.closed),
            connect_fail: minus_map(&self.connect_fail, &earlier.connect_fail),
            accept_pauses: minus_map(&self.accept_pauses, &earlier.accept_pauses),
            per_worker_accepted,
            reloads_success: self.reloads_success.saturating_sub(earlier.reloads_success),
            reloads_failure: self.reloads_failure.saturating_sub(earlier.reloads_failure),
            upgrades_success: self
                .upgrades_success
                .saturating_sub(earlier.upgrades_success),
            upgrades_failure: self
                .upgrades_failure
                .saturating_sub(earlier.upgrades_failure),
            apps,
        }
    }

    /// Add these totals to `view`'s carried counters. Apps and targets are matched by name
    /// (those the new configuration lacks are dropped, as a reload drops them); labels this
    /// binary does not know are ignored. Only one thread calls this (the channel's reader).
    pub fn apply(&self, view: &ProxyView) {
        let base = &view.carried.base;
        base.accepted.add(self.accepted);
        base.bytes_to_upstream.add(self.bytes_to_upstream);
        base.bytes_to_client.add(self.bytes_to_client);
        base.access_log_dropped.add(self.access_log_dropped);
        for r in CloseReason::ALL {
            base.closed[r as usize].add(self.closed.get(r.as_str()).copied().unwrap_or(0));
        }
        for f in ConnectFail::ALL {
            let n = self.connect_fail.get(f.as_str()).copied().unwrap_or(0);
            base.connect_fail[f as usize].add(n);
        }
        for p in PauseCause::ALL {
            let n = self.accept_pauses.get(p.as_str()).copied().unwrap_or(0);
            base.accept_pauses[p as usize].add(n);
        }
        let nworkers = view.carried.per_worker.len().max(1);
        for (i, n) in self.per_worker_accepted.iter().enumerate() {
            if let Some(c) = view.carried.per_worker.get(i % nworkers) {
                c.add(*n);
            }
        }
        view.reloads
            .success
            .fetch_add(self.reloads_success, Relaxed);
        view.reloads
            .failure
            .fetch_add(self.reloads_failure, Relaxed);
        view.upgrades
            .success
            .fetch_add(self.upgrades_success, Relaxed);
        view.upgrades
            .failure
            .fetch_add(self.upgrades_failure, Relaxed);
        for app in view.apps() {
            let Some(t) = self.apps.get(&app.cfg.name) else {
                continue;
            };
            let c = &app.counters;
            c.total.fetch_add(t.total, Relaxed);
            let cell = c.carried();
            cell.to_upstream.add(t.bytes_to_upstream);
            cell.to_client.add(t.bytes_to_client);
            for r in CloseReason::ALL {
                let i = r as usize;
                c.closed[i].fetch_add(t.closed.get(r.as_str()).copied().unwrap_or(0), Relaxed);
                let tr = t.truncated.get(r.as_str()).copied().unwrap_or(0);
                c.truncated[i].fetch_add(tr, Relaxed);
            }
            for target in &app.targets {
                let Some(errs) = t.targets.get(&target.cfg.name) else {
                    continue;
                };
                for f in ConnectFail::ALL {
                    let n = errs.get(f.as_str()).copied().unwrap_or(0);
                    target.counters.connect_errors[f as usize].fetch_add(n, Relaxed);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Sockets received: from an old process, or from systemd.

/// How an inherited listening socket is matched to the configuration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Match {
    /// Handed over by an old process: the configured identity and the worker that held it.
    Key(ListenKey, usize),
    /// From systemd socket activation: its bound address.
    Local(SocketAddr),
}

/// Listening sockets this process was given instead of binding them itself.
#[derive(Debug, Default)]
pub struct Inherited {
    listen: Vec<(Match, TcpListener)>,
    admin: Option<(SocketAddr, TcpListener)>,
    from: &'static str,
}

impl Inherited {
    /// The sockets of systemd socket activation (`LISTEN_FDS`, when `LISTEN_PID` is this
    /// process): each must be a listening TCP socket; each is matched by its bound address.
    pub fn from_systemd() -> Result<Inherited, Error> {
        let fds = sd_notify::listen_fds()
            .map_err(|e| Error::runtime(format!("socket activation (LISTEN_FDS): {e}")))?;
        let mut out = Inherited {
            from: "systemd socket activation",
            ..Inherited::default()
        };
        for n in fds {
            let fd = sys::adopt_fd(n)
                .map_err(|e| Error::io(format!("socket activation: descriptor {n}"), e))?;
            let sock = listener_from(fd)
                .map_err(|e| Error::runtime(format!("socket activation: descriptor {n}: {e}")))?;
            let addr = sock
                .local_addr()
                .map_err(|e| Error::io(format!("socket activation: descriptor {n}"), e))?;
            out.listen.push((Match::Local(addr), sock));
        }
        if !out.listen.is_empty() {
            log::info!(
                "socket activation: {} listening socket(s) from systemd",
                out.listen.len()
            );
        }
        Ok(out)
    }

    pub fn is_empty(&self) -> bool {
        self.listen.is_empty() && self.admin.is_none()
    }

    /// The sockets for listen entry `key`, in worker order (empty: bind it).
    pub fn take_listen(&mut self, key: ListenKey) -> Vec<TcpListener> {
        let mut taken: Vec<(usize, TcpListener)> = Vec::new();
        let mut rest = Vec::with_capacity(self.listen.len());
        for (m, sock) in self.listen.drain(..) {
            match m {
                Match::Key(k, w) if k == key => taken.push((w, sock)),
                Match::Local(a) if key.nth == 0 && a == key.addr && taken.is_empty() => {
                    taken.push((0, sock))
                }
                _ => rest.push((m, sock)),
            }
        }
        self.listen = rest;
        taken.sort_by_key(|(w, _)| *w);
        taken.into_iter().map(|(_, s)| s).collect()
    }

    /// The socket for the admin endpoint configured at `addr`, if one was given.
    pub fn take_admin(&mut self, addr: SocketAddr) -> Option<TcpListener> {
        if self.admin.as_ref().is_some_and(|(a, _)| *a == addr) {
            return self.admin.take().map(|(_, s)| s);
        }
        let i = self
            .listen
            .iter()
            .position(|(m, _)| *m == Match::Local(addr))?;
        Some(self.listen.remove(i).1)
    }

    /// Close what no listener of the configuration took (logged).
    pub fn close_rest(&mut self) {
        for (m, sock) in self.listen.drain(..) {
            let addr = sock
                .local_addr()
                .map_or_else(|_| "?".into(), |a| a.to_string());
            match m {
                Match::Key(k, _) => log::info!(
                    "{}: listener {addr} (configured as {}) is not in the configuration; closing it",
                    self.from,
                    k.addr
                ),
                Match::Local(_) => log::warn!(
                    "{}: socket {addr} matches no listen address of the configuration; closing it",
                    self.from
                ),
            }
        }
        if let Some((a, _)) = self.admin.take() {
            log::info!(
                "{}: admin socket for {a} is not in the configuration; closing it",
                self.from
            );
        }
    }
}

/// A received descriptor as a non-blocking listening TCP socket (checked).
fn listener_from(fd: OwnedFd) -> io::Result<TcpListener> {
    let sock = socket2::Socket::from(fd);
    if sock.r#type()? != socket2::Type::STREAM {
        return Err(invalid("not a stream socket".into()));
    }
    if !sock.is_listener()? {
        return Err(invalid("not a listening socket".into()));
    }
    sock.local_addr()?
        .as_socket()
        .ok_or_else(|| invalid("not a TCP/IP socket".into()))?;
    sock.set_nonblocking(true)?;
    crate::net::tune_listener(socket2::SockRef::from(&sock))?;
    Ok(sock.into())
}

// ---------------------------------------------------------------------------------------
// systemd notification.

/// Tell the service manager (when `NOTIFY_SOCKET` is set) about a state change. Failures
/// are logged, never fatal.
pub fn notify(states: &[sd_notify::NotifyState<'_>]) {
    if std::env::var_os("NOTIFY_SOCKET").is_none() {
        return;
    }
    if let Err(e) = sd_notify::notify(states) {
        log::warn!("sd_notify {states:?}: {e}");
    }
}

// ---------------------------------------------------------------------------------------
// The new process's side.

/// The new process's end of the channel to the process it replaces.
pub struct Predecessor {
    sock: UnixStream,
}

impl Predecessor {
    /// When started by an upgrade (`EPOXY_UPGRADE_FD` set): the channel and the sockets
    /// received on it. `Ok(None)`: a normal start.
    pub fn from_env() -> Result<Option<(Predecessor, Inherited)>, Error> {
        let Some(v) = std::env::var_os(ENV_FD) else {
            return Ok(None);
        };
        let err = |e: String| Error::runtime(format!("upgrade: {e}"));
        let n: i32 = v
            .to_str()
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| err(format!("{ENV_FD}={v:?} is not a descriptor number")))?;
        let fd = sys::adopt_fd(n).map_err(|e| err(format!("descriptor {n}: {e}")))?;
        let sock = UnixStream::from(fd);
        sock.set_read_timeout(Some(PEER_TIMEOUT))
            .map_err(|e| err(e.to_string()))?;
        let mut inherited = Inherited {
            from: "upgrade",
            ..Inherited::default()
        };
        loop {
            let mut fds = Vec::new();
            let frame = read_frame(&sock, &mut fds)
                .map_err(|e| err(format!("receive the listening sockets: {e}")))?;
            let Some(Frame::Sockets {
                version,
                entries,
                more,
            }) = frame
            else {
                return Err(err("expected the listening sockets first".into()));
            };
            if version != VERSION {
                return Err(err(format!(
                    "channel version {version}, this binary speaks {VERSION}"
                )));
            }
            if fds.len() != entries.len() {
                return Err(err(format!(
                    "{} socket(s) announced, {} descriptor(s) received",
                    entries.len(),
                    fds.len()
                )));
            }
            for (e, fd) in entries.into_iter().zip(fds) {
                let sock =
                    listener_from(fd).map_err(|x| err(format!("socket for {}: {x}", e.addr)))?;
                match e.kind {
                    SocketKind::Listen => inherited.listen.push((
                        Match::Key(
                            ListenKey {
                                addr: e.addr,
                                nth: e.nth,
                            },
                            e.worker,
                        ),
                        sock,
                    )),
                    SocketKind::Admin => inherited.admin = Some((e.addr, sock)),
                }
            }
            if !more {
                break;
            }
        }
        log::info!(
            "upgrade: received {} listening socket(s){} from PID {}",
            inherited.listen.len(),
            if inherited.admin.is_some() {
                " and the admin socket"
            } else {
                ""
            },
            parent_pid()
        );
        Ok(Some((Predecessor { sock }, inherited)))
    }

    /// Tell the old process why this one cannot take over (it keeps serving).
    pub fn fail(&self, reason: &str) {
        let f = Frame::Failed {
            pid: std::process::id(),
            reason: reason.to_string(),
        };
        let _ = write_frame(&self.sock, &f, &[]);
    }

    /// Say `Ready` and wait for `Go`: after it this process owns the listeners.
    pub fn handshake(&self) -> Result<(), Error> {
        test_hold(ENV_TEST_HOLD_MS, "ready");
        let err = |e: String| Error::runtime(format!("upgrade: {e}"));
        write_frame(
            &self.sock,
            &Frame::Ready {
                pid: std::process::id(),
            },
            &[],
        )
        .map_err(|e| err(format!("tell the old process we are ready: {e}")))?;
        let mut fds = Vec::new();
        match read_frame(&self.sock, &mut fds) {
            Ok(Some(Frame::Go {})) if fds.is_empty() => Ok(()),
            Ok(None) => Err(err(
                "the old process closed the channel before the hand-over".into(),
            )),
            Ok(Some(f)) => Err(err(format!("expected go, got {f:?}"))),
            Err(e) => Err(err(format!("wait for the hand-over: {e}"))),
        }
    }

    /// Until the old process exits: take the live pairs it moves here (through `adopter`)
    /// and add its totals to `view`.
    pub fn follow(
        self,
        view: Arc<ProxyView>,
        mut adopter: Box<dyn Adopter>,
    ) -> io::Result<JoinHandle<()>> {
        let _ = self.sock.set_read_timeout(None);
        std::thread::Builder::new()
            .name("epoxy-upgrade".into())
            .spawn(move || {
                // The batch taken and not yet committed or aborted.
                let mut pending: Option<(u64, Vec<Import>)> = None;
                loop {
                    let mut fds = Vec::new();
                    let frame = match read_frame(&self.sock, &mut fds) {
                        Ok(Some(f)) => f,
                        Ok(None) => break,
                        Err(e) => {
                            log::warn!("upgrade: channel from the old process: {e}");
                            break;
                        }
                    };
                    match frame {
                        Frame::Counters { totals } => totals.apply(&view),
                        Frame::Pairs {
                            batch, count, blob, ..
                        } => {
                            if let Some((_, imports)) = pending.take() {
                                adopter.release(imports);
                            }
                            test_hold(ENV_TEST_MIGRATE_HOLD_MS, "batch");
                            let (taken, imports) =
                                take_batch(&mut *adopter, &blob, count as usize, fds);
                            // Reserved before the answer: a commit may follow at once.
                            pending = Some((batch, imports));
                            let reply = Frame::Taken { batch, taken };
                            if let Err(e) = write_frame(&self.sock, &reply, &[]) {
                                log::warn!("upgrade: answer the old process: {e}");
                                break;
                            }
                        }
                        Frame::Commit { batch, stall_us } => match pending.take() {
                            Some((b, imports)) if b == batch => {
                                test_hold(ENV_TEST_COMMIT_HOLD_MS, "commit");
                                let n = imports.len() as u64;
                                adopter.adopt(imports);
                                view.migration.record(n, stall_us);
                            }
                            other => {
                                pending = other;
                                log::warn!("upgrade: commit of unknown batch {batch}");
                            }
                        },
                        Frame::Abort { batch } => match pending.take() {
                            Some((b, imports)) if b == batch => adopter.release(imports),
                            other => pending = other,
                        },
                        f => {
                            log::warn!("upgrade: unexpected frame from the old process: {f:?}");
                            break;
                        }
                    }
                }
                if let Some((_, imports)) = pending.take() {
                    adopter.release(imports);
                }
            })
    }
}

/// Where the pairs an old process moves here go (the control side implements it).
pub trait Adopter: Send {
    /// Check one moved pair against this process's configuration and reserve its slots.
    fn prepare(
        &mut self,
        record: PairRecord,
        client: std::net::TcpStream,
        upstream: std::net::TcpStream,
    ) -> Result<Import, String>;
    /// Serve these (the old process let go of them).
    fn adopt(&mut self, imports: Vec<Import>);
    /// Give back what `prepare` reserved (the old process keeps them).
    fn release(&mut self, imports: Vec<Import>);
}

/// Decode and prepare a batch: which records were taken, and the imports of those.
fn take_batch(
    adopter: &mut dyn Adopter,
    blob: &[u8],
    count: usize,
    fds: Vec<OwnedFd>,
) -> (Vec<bool>, Vec<Import>) {
    let mut taken = vec![false; count.min(sys::MAX_FDS_PER_MESSAGE)];
    let mut imports = Vec::new();
    if fds.len() != count * 2 || count > sys::MAX_FDS_PER_MESSAGE {
        log::warn!(
            "upgrade: {count} pair(s) announced with {} descriptor(s); taking none",
            fds.len()
        );
        return (taken, imports);
    }
    let records = match split_records(blob, count) {
        Ok(r) => r,
        Err(e) => {
            log::warn!("upgrade: {e}; taking none of the batch");
            return (taken, imports);
        }
    };
    let mut fds = fds.into_iter();
    for (i, rec) in records.into_iter().enumerate() {
        let (Some(c), Some(u)) = (fds.next(), fds.next()) else {
            break;
        };
        let rec = match rec {
            Ok(r) => r,
            Err(e) => {
                log::warn!("upgrade: pair {i}: {e}; the old process keeps it");
                continue;
            }
        };
        let addr = rec.client_addr;
        match adopter.prepare(rec, c.into(), u.into()) {
            Ok(imp) => {
                taken[i] = true;
                imports.push(imp);
            }
            Err(why) => log::warn!("upgrade: pair from {addr}: {why}; the old process keeps it"),
        }
    }
    (taken, imports)
}

fn parent_pid() -> u32 {
    std::os::unix::process::parent_id()
}

// ---------------------------------------------------------------------------------------
// The old process's side.

/// How to start the new process: the binary path as it was at start, and the arguments.
#[derive(Debug, Clone)]
pub struct ExecSpec {
    pub exe: PathBuf,
    pub args: Vec<OsString>,
}

impl ExecSpec {
    /// This process's binary and arguments (call at start, before the file may be replaced).
    pub fn current() -> Option<ExecSpec> {
        let exe = std::env::current_exe().ok()?;
        Some(ExecSpec {
            exe,
            args: std::env::args_os().skip(1).collect(),
        })
    }
}

/// An upgrade in flight: the thread that starts the new process and waits for `Ready`.
pub struct Upgrader {
    pub pid: u32,
    rx: Receiver<Result<Successor, String>>,
    thread: Option<JoinHandle<()>>,
}

/// A new process that said `Ready`.
pub struct Successor {
    pub pid: u32,
    sock: UnixStream,
    child: Child,
}

impl Upgrader {
    /// Start the new process and hand it `sockets`. `wake` is called when the outcome is
    /// known. An error here (spawn failed) is the outcome.
    pub fn start(
        spec: &ExecSpec,
        sockets: Vec<(SocketEntry, OwnedFd)>,
        wake: Box<dyn Fn() + Send>,
    ) -> Result<Upgrader, String> {
        let (ours, theirs) = UnixStream::pair().map_err(|e| format!("socketpair: {e}"))?;
        let inheritable =
            sys::dup_inheritable(theirs.as_fd()).map_err(|e| format!("channel descriptor: {e}"))?;
        drop(theirs);
        let fd_no = std::os::fd::AsRawFd::as_raw_fd(&inheritable);
        let child = Command::new(&spec.exe)
            .args(&spec.args)
            .env(ENV_FD, fd_no.to_string())
            .env_remove("LISTEN_FDS")
            .env_remove("LISTEN_PID")
            .env_remove("LISTEN_FDNAMES")
            .stdin(Stdio::null())
            .spawn()
            .map_err(|e| format!("start {}: {e}", spec.exe.display()))?;
        // The child has its copy; ours would keep the channel open if it dies.
        drop(inheritable);
        let pid = child.id();
        log::info!(
            "upgrade: started new process PID {pid} ({}); handing over {} socket(s)",
            spec.exe.display(),
            sockets.len()
        );
        let (tx, rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("epoxy-upgrade".into())
            .spawn(move || {
                let res = wait_ready(ours, child, sockets);
                let _ = tx.send(res);
                wake();
            })
            .map_err(|e| format!("spawn upgrade thread: {e}"))?;
        Ok(Upgrader {
            pid,
            rx,
            thread: Some(thread),
        })
    }

    /// The outcome, once known.
    pub fn poll(&mut self) -> Option<Result<Successor, String>> {
        let res = self.rx.try_recv().ok()?;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        Some(res)
    }
}

/// Send the sockets, then wait for `Ready`; on any failure reap (or kill) the child.
fn wait_ready(
    sock: UnixStream,
    mut child: Child,
    sockets: Vec<(SocketEntry, OwnedFd)>,
) -> Result<Successor, String> {
    let pid = child.id();
    let res = (|| {
        send_sockets(&sock, &sockets).map_err(|e| format!("hand over the sockets: {e}"))?;
        drop(sockets);
        sock.set_read_timeout(Some(READY_TIMEOUT))
            .map_err(|e| e.to_string())?;
        let mut fds = Vec::new();
        match read_frame(&sock, &mut fds) {
            Ok(Some(Frame::Ready { .. })) => Ok(()),
            Ok(Some(Frame::Failed { reason, .. })) => Err(reason),
            Ok(Some(f)) => Err(format!("unexpected frame {f:?}")),
            Ok(None) => Err("it exited before it was ready".to_string()),
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                Err(format!("not ready within {READY_TIMEOUT:?}"))
            }
            Err(e) => Err(format!("channel: {e}")),
        }
    })();
    match res {
        Ok(()) => Ok(Successor { pid, sock, child }),
        Err(why) => {
            drop(sock);
            let status = reap(&mut child, Duration::from_secs(5));
            Err(format!("new process PID {pid}: {why} ({status})"))
        }
    }
}

fn send_sockets(sock: &UnixStream, sockets: &[(SocketEntry, OwnedFd)]) -> io::Result<()> {
    let chunks: Vec<&[(SocketEntry, OwnedFd)]> = if sockets.is_empty() {
        vec![&[]]
    } else {
        sockets.chunks(sys::MAX_FDS_PER_MESSAGE).collect()
    };
    let last = chunks.len() - 1;
    for (i, chunk) in chunks.into_iter().enumerate() {
        let frame = Frame::Sockets {
            version: VERSION,
            entries: chunk.iter().map(|(e, _)| *e).collect(),
            more: i < last,
        };
        let fds: Vec<BorrowedFd<'_>> = chunk.iter().map(|(_, fd)| fd.as_fd()).collect();
        write_frame(sock, &frame, &fds)?;
    }
    Ok(())
}

/// Wait up to `patience` for `child` to exit, then kill it; describe how it ended.
fn reap(child: &mut Child, patience: Duration) -> String {
    let deadline = Instant::now() + patience;
    loop {
        match child.try_wait() {
            Ok(Some(st)) => return st.to_string(),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(10)),
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return "killed: it did not exit".into();
            }
            Err(e) => return format!("wait: {e}"),
        }
    }
}

impl Successor {
    /// Tell the new process to take over. An error means it is gone (keep serving).
    pub fn go(&mut self) -> Result<(), String> {
        write_frame(&self.sock, &Frame::Go {}, &[]).map_err(|e| {
            let status = reap(&mut self.child, Duration::from_secs(1));
            format!(
                "new process PID {}: hand-over failed: {e} ({status})",
                self.pid
            )
        })
    }

    /// Send totals to add to the new process's counters (best effort).
    pub fn send_counters(&self, totals: Totals) {
        let f = Frame::Counters {
            totals: Box::new(totals),
        };
        if let Err(e) = write_frame(&self.sock, &f, &[]) {
            log::warn!("upgrade: send counters to PID {}: {e}", self.pid);
        }
    }

    /// Send a batch of parked pairs (at most `sys::MAX_FDS_PER_MESSAGE / 2`) and wait up to
    /// `timeout` for which the new process takes.
    pub fn offer(
        &mut self,
        batch: u64,
        pairs: &[Export],
        timeout: Duration,
    ) -> Result<Vec<bool>, String> {
        let mut blob = Vec::new();
        let mut rec = Vec::new();
        for p in pairs {
            rec.clear();
            p.record.encode(&mut rec);
            blob.extend_from_slice(&(rec.len() as u32).to_be_bytes());
            blob.extend_from_slice(&rec);
        }
        let frame = Frame::Pairs {
            batch,
            count: pairs.len() as u32,
            len: blob.len() as u32,
            blob,
        };
        let fds: Vec<BorrowedFd<'_>> = pairs
            .iter()
            .flat_map(|p| [p.fds[0].as_fd(), p.fds[1].as_fd()])
            .collect();
        write_frame(&self.sock, &frame, &fds).map_err(|e| format!("send pairs: {e}"))?;
        self.sock
            .set_read_timeout(Some(timeout))
            .map_err(|e| e.to_string())?;
        let mut got = Vec::new();
        match read_frame(&self.sock, &mut got) {
            Ok(Some(Frame::Taken { batch: b, taken }))
                if b == batch && taken.len() == pairs.len() =>
            {
                Ok(taken)
            }
            Ok(Some(f)) => Err(format!("unexpected answer {f:?}")),
            Ok(None) => Err("the new process closed the channel".into()),
            Err(e) => Err(format!("no answer: {e}")),
        }
    }

    /// The taken pairs of `batch` are the new process's now.
    pub fn commit(&self, batch: u64, stall_us: u64) -> Result<(), String> {
        write_frame(&self.sock, &Frame::Commit { batch, stall_us }, &[])
            .map_err(|e| format!("commit: {e}"))
    }

    /// This process keeps every pair of `batch` (best effort: a dead peer needs no word).
    pub fn abort(&self, batch: u64) {
        let _ = write_frame(&self.sock, &Frame::Abort { batch }, &[]);
    }

    /// The last word before this process exits: close the sending side and wait up to
    /// `patience` for the new process to close its end, which it does once it has read every
    /// frame (pairs committed, final counters). So whoever sees this process gone finds every
    /// moved pair listed, and the totals carried over, in the new one.
    pub fn finish(self, patience: Duration) {
        let _ = self.sock.shutdown(Shutdown::Write);
        let deadline = Instant::now() + patience;
        let mut buf = [0u8; 512];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                log::warn!(
                    "upgrade: PID {} did not close the channel within {patience:?}",
                    self.pid
                );
                return;
            }
            // Nothing more is expected from it; whatever comes is read and dropped. A read
            // that times out goes round to the deadline check.
            let read = self
                .sock
                .set_read_timeout(Some(left))
                .and_then(|()| (&self.sock).read(&mut buf));
            match read {
                Ok(0) => return,
                Err(e)
                    if !matches!(
                        e.kind(),
                        io::ErrorKind::Interrupted
                            | io::ErrorKind::WouldBlock
                            | io::ErrorKind::TimedOut
                    ) =>
                {
                    return;
                }
                _ => {}
            }
        }
    }

    /// Drop a new process that said ready but must not take over (shutdown began): closing
    /// the channel before `Go` makes it exit.
    pub fn abandon(mut self) -> String {
        drop(self.sock);
        reap(&mut self.child, Duration::from_secs(5))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_with_descriptors() {
        let (a, b) = UnixStream::pair().expect("pair");
        let l1 = TcpListener::bind("127.0.0.1:0").expect("bind");
        let l2 = TcpListener::bind("127.0.0.1:0").expect("bind");
        let entries = vec![
            (
                SocketEntry {
                    kind: SocketKind::Listen,
                    addr: "127.0.0.1:0".parse().expect("addr"),
                    nth: 0,
                    worker: 1,
                },
                OwnedFd::from(l1.try_clone().expect("clone")),
            ),
            (
                SocketEntry {
                    kind: SocketKind::Admin,
                    addr: "127.0.0.1:0".parse().expect("addr"),
                    nth: 0,
                    worker: 0,
                },
                OwnedFd::from(l2.try_clone().expect("clone")),
            ),
        ];
        send_sockets(&a, &entries).expect("send");
        let mut fds = Vec::new();
        let f = read_frame(&b, &mut fds).expect("read").expect("frame");
        match f {
            Frame::Sockets {
                entries: e, more, ..
            } => {
                assert!(!more);
                assert_eq!(e.len(), 2);
                assert_eq!(e[0].worker, 1);
            }
            other => panic!("got {other:?}"),
        }
        assert_eq!(fds.len(), 2);
        let got = listener_from(fds.remove(0)).expect("listener");
        assert_eq!(
            got.local_addr().expect("addr"),
            l1.local_addr().expect("addr")
        );
        drop(a);
        assert!(read_frame(&b, &mut fds).expect("eof").is_none());
    }

    #[test]
    fn bad_frames_are_errors_not_panics() {
        for body in [
            &b"{}"[..],
            b"{\"type\":\"go\",\"x\":1}",
            b"{\"type\":\"launch\"}",
            b"[1,2]",
            b"\xff\xfe",
        ] {
            assert!(decode(body).is_err(), "{:?}", String::from_utf8_lossy(body));
        }
        let (a, b) = UnixStream::pair().expect("pair");
        let mut w = &a;
        w.write_all(&u32::MAX.to_be_bytes()).expect("write");
        assert!(read_frame(&b, &mut Vec::new()).is_err());
        w.write_all(&[0, 0, 0, 9, b'{']).expect("write");
        drop(a);
        assert!(read_frame(&b, &mut Vec::new()).is_err());
    }

    #[test]
    fn a_non_listening_socket_is_refused() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let s = std::net::TcpStream::connect(l.local_addr().expect("addr")).expect("connect");
        assert!(listener_from(OwnedFd::from(s)).is_err());
        let (u, _) = UnixStream::pair().expect("pair");
        assert!(listener_from(OwnedFd::from(u)).is_err());
    }

    #[test]
    fn totals_subtract_by_label() {
        let mut a = Totals {
            accepted: 10,
            per_worker_accepted: vec![6, 4],
            ..Totals::default()
        };
        a.closed.insert("eof".into(), 7);
        let mut b = a.clone();
        b.accepted = 15;
        b.per_worker_accepted = vec![9, 6];
        b.closed.insert("eof".into(), 9);
        b.closed.insert("timeout".into(), 1);
        let d = b.minus(&a);
        assert_eq!(d.accepted, 5);
        assert_eq!(d.per_worker_accepted, vec![3, 2]);
        assert_eq!(d.closed.get("eof"), Some(&2));
        assert_eq!(d.closed.get("timeout"), Some(&1));
        // Shrinks never underflow.
        assert_eq!(a.minus(&b).accepted, 0);
    }
}
