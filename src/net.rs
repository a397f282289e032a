//! Socket setup: binding listeners and starting non-blocking connects, with the tuning every
//! socket gets (TCP_NODELAY, SO_REUSEADDR, IPV6_V6ONLY). socket2 builds the sockets; mio takes
//! them over. No I/O on established connections happens here.

use std::io;
use std::net::SocketAddr;

use socket2::{Domain, Protocol, Socket, Type};

/// Bind and listen on `addr`. `reuse_port` is set only when several workers share the address
/// (so a second, unrelated process cannot silently share our port).
pub fn bind_listener(
    addr: SocketAddr,
    backlog: i32,
    reuse_port: bool,
) -> io::Result<std::net::TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    if addr.is_ipv6() {
        // "[::]:80" and "0.0.0.0:80" are distinct listeners, as in nginx.
        socket.set_only_v6(true)?;
    }
    socket.set_nonblocking(true)?;
    tune_listener(socket2::SockRef::from(&socket))?;
    socket.bind(&addr.into())?;
    socket.listen(backlog)?;
    Ok(socket.into())
}

/// Start a non-blocking connect to `addr` (completion is reported as WRITABLE).
pub fn connect_nonblocking(addr: SocketAddr) -> io::Result<mio::net::TcpStream> {
    let stream = mio::net::TcpStream::connect(addr)?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Options every listening socket gets, whoever bound it (this process, an old one before
/// an upgrade, systemd): TCP_NODELAY, which Linux copies to each accepted socket, so the
/// accept path sets nothing per connection.
pub fn tune_listener(sock: socket2::SockRef<'_>) -> io::Result<()> {
    sock.set_tcp_nodelay(true)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The accept path sets no option per connection: TCP_NODELAY must come from the
    /// listener (Linux copies it to accepted sockets).
    #[test]
    fn accepted_sockets_inherit_nodelay_from_the_listener() {
        let l = bind_listener("127.0.0.1:0".parse().expect("addr"), 16, false).expect("bind");
        l.set_nonblocking(false).expect("blocking");
        let addr = l.local_addr().expect("addr");
        let _c = std::net::TcpStream::connect(addr).expect("connect");
        let (a, _) = l.accept().expect("accept");
        assert!(
            a.nodelay().expect("getsockopt"),
            "TCP_NODELAY not inherited"
        );
    }
}
