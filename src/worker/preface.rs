//! From accepted client to connecting pair: read the client's preface when the app needs it
//! (a PROXY protocol header with `accept_proxy`, a TLS ClientHello peeked for SNI routing),
//! then admit the pair — source ACL, per-source limit, the PROXY header toward the target
//! with `send_proxy` — and start connecting on the chosen route. The preface accumulates in
//! the pair's `to_upstream` buffer and is re-parsed from the start on each read (a PROXY
//! header is at most a few hundred bytes, a ClientHello a few KiB), so no parser state is kept
//! between events; ClientHello bytes stay in the buffer and are forwarded untouched, the PROXY
//! header read from the client is dropped. Refused clients are closed at once, before any
//! upstream connect, and counted by reason; nothing is logged per connection above debug.
//! Never allocates.

use std::io::{self, Read};
use std::net::SocketAddr;
use std::sync::Arc;

use super::Worker;
use super::pair::PairState;
use crate::acl::Verdict;
use crate::config::ProxyVersion;
use crate::outcome::{CloseReason, Side};
use crate::{proxy_proto, sni};

/// Most bytes of a ClientHello peeked at (and the most a preface may take).
pub const PEEK_MAX: usize = 16 * 1024;
/// Room kept in the buffer for the PROXY header epoxy writes in front (`send_proxy`).
const SEND_HEADER_MAX: usize = 108;
/// Longest server name kept per pair for `/connections` and the access log.
pub const NAME_MAX: usize = 255;

/// What the preface read so far says.
enum Decision {
    /// Read more.
    Wait,
    /// Close with this reason.
    Refuse(CloseReason),
    /// Admit on `route`; `header` PROXY-header bytes lead the buffer; `addrs` are the header's
    /// (source, destination) when it carried any.
    Admit {
        route: usize,
        header: usize,
        addrs: Option<(SocketAddr, SocketAddr)>,
        name_len: usize,
    },
}

impl Worker {
    /// Whether clients of `app` send a preface epoxy must read before choosing a target.
    pub(super) fn needs_preface(app: &crate::backend::AppRuntime) -> bool {
        app.cfg.accept_proxy || app.routes_by_sni()
    }

    /// The client of a pair in `Preface` is readable (or hung up): read and decide.
    pub(super) fn on_preface(&mut self, idx: usize) {
        let size = self.pool.buffer_size();
        loop {
            let Some(pair) = self.pairs.get_mut(idx) else {
                return;
            };
            let limit = size.min(PEEK_MAX)
                - if pair.app.cfg.send_proxy.is_some() {
                    SEND_HEADER_MAX
                } else {
                    0
                };
            let room = limit.saturating_sub(pair.to_upstream.buf.pending());
            let (Some(sock), true) = (pair.client.sock.as_mut(), room > 0 && !pair.to_upstream.eof)
            else {
                // Full (or ended) and still undecided: decide on what is there.
                return self.preface_settle(idx, true);
            };
            let Some(space) = pair.to_upstream.buf.tail_space(&mut self.pool) else {
                return self.preface_settle(idx, true);
            };
            let want = room.min(space.len());
            match sock.read(&mut space[..want]) {
                Ok(0) => pair.to_upstream.eof = true,
                Ok(n) => pair.to_upstream.buf.appended(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    pair.client.readable = false;
                    return self.preface_settle(idx, false);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return self.close(idx, CloseReason::from_io(Side::Client, e.kind())),
            }
            let eof = pair.to_upstream.eof;
            match self.preface_decide(idx, eof) {
                Decision::Wait => continue,
                d => return self.preface_apply(idx, d),
            }
        }
    }

    /// The preface timeout passed: a missing PROXY header is refused; an unfinished
    /// ClientHello is routed on what arrived (default route, or refused with `sni_required`).
    pub(super) fn on_preface_timeout(&mut self, idx: usize) {
        self.preface_settle(idx, true);
    }

    /// Decide now if the bytes so far allow it; with `final_`, nothing more will come.
    fn preface_settle(&mut self, idx: usize, final_: bool) {
        match self.preface_decide(idx, final_) {
            Decision::Wait => {}
            d => self.preface_apply(idx, d),
        }
    }

    /// Parse what the client sent so far. `final_`: no more bytes will come (EOF, timeout,
    /// full buffer), so "incomplete" becomes a decision.
    fn preface_decide(&mut self, idx: usize, final_: bool) -> Decision {
        let Some(pair) = self.pairs.get_mut(idx) else {
            return Decision::Wait;
        };
        let app = &pair.app;
        let data = pair.to_upstream.buf.data(&mut self.pool);
        let (header, addrs) = if app.cfg.accept_proxy {
            match proxy_proto::parse(data) {
                Ok(proxy_proto::Parsed::Done { header_len, addrs }) => (header_len, addrs),
                Ok(proxy_proto::Parsed::Incomplete) if final_ => {
                    return Decision::Refuse(CloseReason::ProxyHeader);
                }
                Ok(proxy_proto::Parsed::Incomplete) => return Decision::Wait,
                Err(e) => {
                    log::debug!(
                        "app '{}': PROXY header from {}: {e:?}",
                        app.cfg.name,
                        pair.client_addr
                    );
                    return Decision::Refuse(CloseReason::ProxyHeader);
                }
            }
        } else {
            (0, None)
        };
        if !app.routes_by_sni() {
            return Decision::Admit {
                route: 0,
                header,
                addrs,
                name_len: 0,
            };
        }
        let name = &mut self.names[idx * NAME_MAX..(idx + 1) * NAME_MAX];
        let found = match sni::peek_sni(&data[header..], name) {
            Ok(sni::Sni::Name(n)) => Some(n),
            Ok(sni::Sni::Incomplete) if !final_ => return Decision::Wait,
            Ok(sni::Sni::Incomplete | sni::Sni::NoSni | sni::Sni::NotTls) | Err(_) => None,
        };
        match found {
            Some(n) => {
                let route = std::str::from_utf8(&name[..n]).map_or(0, |s| app.route_for(Some(s)));
                Decision::Admit {
                    route,
                    header,
                    addrs,
                    name_len: n,
                }
            }
            None if app.cfg.sni_required => Decision::Refuse(CloseReason::SniRequired),
            None => Decision::Admit {
                route: 0,
                header,
                addrs,
                name_len: 0,
            },
        }
    }

    fn preface_apply(&mut self, idx: usize, d: Decision) {
        match d {
            Decision::Wait => {}
            Decision::Refuse(reason) => self.close(idx, reason),
            Decision::Admit {
                route,
                header,
                addrs,
                name_len,
            } => {
                let Some(pair) = self.pairs.get_mut(idx) else {
                    return;
                };
                pair.to_upstream.buf.consumed(header);
                pair.sni_len = name_len.min(NAME_MAX) as u8;
                let local = addrs.map(|(src, dst)| {
                    pair.client_addr = src;
                    dst
                });
                self.admit_pair(idx, route, local);
            }
        }
    }

    /// Admit a pair whose client and route are known: ACL, per-source limit, the PROXY header
    /// toward the target, then the connect. `local`: the address the client connected to, as
    /// its PROXY header says (else the accepted socket's).
    pub(super) fn admit_pair(&mut self, idx: usize, route: usize, local: Option<SocketAddr>) {
        let Some(pair) = self.pairs.get_mut(idx) else {
            return;
        };
        let ip = pair.client_addr.ip();
        if let Some(acl) = &pair.app.acl
            && acl.permits(ip) != Verdict::Allowed
        {
            return self.close(idx, CloseReason::AclDenied);
        }
        if let (Some(table), Some(limit)) = (&pair.app.sources, pair.app.cfg.max_conns_per_source) {
            if !table.try_add(ip, limit) {
                return self.close(idx, CloseReason::SourceLimit);
            }
            pair.source_counted = true;
        }
        // Bytes that arrived in the preface are payload.
        let flow = &mut pair.to_upstream;
        flow.read += flow.buf.pending() as u64;
        if let Some(version) = pair.app.cfg.send_proxy {
            let dst = local.or_else(|| pair.client.sock.as_ref().and_then(|s| s.local_addr().ok()));
            let mut hdr = [0u8; SEND_HEADER_MAX];
            let n = match (version, dst) {
                (ProxyVersion::V1, Some(dst)) => {
                    proxy_proto::encode_v1(pair.client_addr, dst, &mut hdr)
                }
                (ProxyVersion::V2, Some(dst)) => {
                    proxy_proto::encode_v2(pair.client_addr, dst, &mut hdr)
                }
                (_, None) => 0,
            };
            if n == 0 || !pair.to_upstream.buf.prepend(&mut self.pool, &hdr[..n]) {
                log::debug!("app '{}': cannot write the PROXY header", pair.app.cfg.name);
                return self.close(idx, CloseReason::Internal);
            }
            pair.to_upstream.header = n as u16;
        }
        pair.state = PairState::Connecting;
        let app_idx = match self.apps.get(pair.app_idx as usize) {
            Some(a) if Arc::ptr_eq(a, &pair.app) => pair.app_idx as usize,
            // A reload replaced the generation while the preface was read: balance over the
            // new generation's app of the same name, if it is still there.
            _ => match self
                .apps
                .iter()
                .position(|a| a.cfg.name == pair.app.cfg.name)
            {
                Some(i) if self.apps[i].targets.len() == pair.app.targets.len() => i,
                _ => return self.close(idx, CloseReason::NoBackend),
            },
        };
        self.choose_candidates(idx, app_idx, route);
        self.start_connect(idx);
    }
}
