//! Edge features end to end: PROXY protocol toward nginx and from HAProxy (real peers from
//! Debian packages, given listening sockets this test holds, so no port is picked and
//! released), strict header reading (timeout, garbage, one byte at a time, bytes after the
//! header), source ACLs over 127.0.0.x and ::1, the per-source cap, and SNI routing of
//! passed-through TLS to `openssl s_server` instances. A missing peer binary fails the test
//! with a clear message (CI installs them).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use super::util::cfg::{any_port, http_get, metric, metrics_text, start_one_app};
use super::util::{
    CountingServer, assert_echo, echo_server, ipv6_available, roundtrip, scaled_secs, wait_closed,
    wait_until,
};

/// A peer process (nginx, haproxy, openssl), killed on drop.
struct Peer {
    child: Child,
    what: &'static str,
}

impl Drop for Peer {
    /// SIGTERM first, so a master process (nginx) takes its workers down with it.
    fn drop(&mut self) {
        let _ = super::util::send_signal(self.child.id(), libc::SIGTERM);
        let deadline = Instant::now() + scaled_secs(5);
        while Instant::now() < deadline {
            if self.child.try_wait().is_ok_and(|s| s.is_some()) {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        eprintln!("{} did not stop on SIGTERM; killing it", self.what);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn need(bin: &str, package: &str) -> PathBuf {
    for dir in ["/usr/sbin", "/usr/bin", "/sbin", "/bin", "/usr/local/bin"] {
        let p = Path::new(dir).join(bin);
        if p.exists() {
            return p;
        }
    }
    panic!("`{bin}` not found: install Debian's `{package}` package (.ci/run does)");
}

/// A listening socket on 127.0.0.1:0 that a child process inherits (close-on-exec off).
fn inheritable_listener() -> TcpListener {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind");
    socket2::SockRef::from(&l)
        .set_cloexec(false)
        .expect("clear close-on-exec");
    l
}

fn temp_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!(
        "epoxy-edge-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    std::fs::create_dir_all(&d).expect("temp dir");
    d
}

/// Connect from source address `src` (e.g. 127.0.0.2) to `dst`.
fn connect_from(src: &str, dst: SocketAddr) -> TcpStream {
    let ip: std::net::IpAddr = src.parse().expect("source address");
    let src = SocketAddr::new(ip, 0);
    let s = socket2::Socket::new(
        socket2::Domain::for_address(dst),
        socket2::Type::STREAM,
        None,
    )
    .expect("socket");
    s.bind(&src.into()).expect("bind source");
    s.connect_timeout(&dst.into(), scaled_secs(5))
        .expect("connect");
    let s: TcpStream = s.into();
    s.set_read_timeout(Some(scaled_secs(10))).expect("timeout");
    s
}

/// nginx `http` on an inherited socket with `listen ... proxy_protocol`: answers every
/// request with the client address and port the PROXY header gave it.
fn nginx_proxy_protocol() -> (Peer, SocketAddr) {
    let bin = need("nginx", "nginx-light");
    let l = inheritable_listener();
    let addr = l.local_addr().expect("addr");
    let d = temp_dir("nginx");
    let t = d.display();
    let conf = format!(
        "worker_processes 1; daemon off; pid {t}/nginx.pid; error_log {t}/error.log;\n\
         events {{ worker_connections 64; }}\n\
         http {{ access_log off; client_body_temp_path {t}; proxy_temp_path {t};\n\
           fastcgi_temp_path {t}; uwsgi_temp_path {t}; scgi_temp_path {t};\n\
           server {{ listen {addr} proxy_protocol;\n\
             location / {{ return 200 \"$proxy_protocol_addr:$proxy_protocol_port\\n\"; }} }} }}\n"
    );
    std::fs::write(d.join("nginx.conf"), conf).expect("write nginx.conf");
    let child = Command::new(bin)
        .arg("-c")
        .arg(d.join("nginx.conf"))
        .arg("-e")
        .arg(d.join("error.log"))
        .env("NGINX", format!("{};", l.as_raw_fd()))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start nginx");
    // The socket is nginx's now (it inherited it); ours stays open, so nothing else can bind.
    std::mem::forget(l);
    (
        Peer {
            child,
            what: "nginx",
        },
        addr,
    )
}

/// One HTTP/1.0 GET through `addr`; the body.
fn get_body(addr: SocketAddr, from: &str) -> (SocketAddr, String) {
    let mut s = connect_from(from, addr);
    let local = s.local_addr().expect("local");
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        .expect("request");
    let mut resp = String::new();
    let _ = s.read_to_string(&mut resp);
    let body = resp
        .split("\r\n\r\n")
        .nth(1)
        .unwrap_or("")
        .trim()
        .to_string();
    (local, body)
}

#[test]
fn send_proxy_v1_and_v2_reach_nginx_with_the_client_address() {
    let (nginx, backend) = nginx_proxy_protocol();
    for version in ["v1", "v2"] {
        let p = start_one_app(
            "pp",
            false,
            &format!("targets = [\"{backend}\"]\nsend_proxy = \"{version}\"\n"),
        );
        let addr = p.app_addr("pp");
        // nginx may still be starting: retry until it answers.
        let mut last = (addr, String::new());
        let ok = wait_until(scaled_secs(10), || {
            last = get_body(addr, "127.0.0.7");
            !last.1.is_empty()
        });
        assert!(ok, "{}: no answer through epoxy {version}", nginx.what);
        assert_eq!(
            last.1,
            format!("{}:{}", last.0.ip(), last.0.port()),
            "send_proxy {version}: nginx saw another client"
        );
    }
}

/// HAProxy `mode tcp` with `send-proxy-v2` in front of epoxy with `accept_proxy`.
#[test]
fn accept_proxy_attributes_haproxys_client() {
    let bin = need("haproxy", "haproxy");
    let echo = echo_server();
    let p = start_one_app(
        "ap",
        true,
        &format!("targets = [\"{}\"]\naccept_proxy = true\n", echo.addr()),
    );
    let epoxy = p.app_addr("ap");
    let l = inheritable_listener();
    let front = l.local_addr().expect("addr");
    let d = temp_dir("haproxy");
    let conf = format!(
        // maxconn sizes HAProxy's fd table, which must reach the inherited fd's number.
        "global\n  maxconn 8000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 30s\n  timeout server 30s\n\
         frontend f\n  bind fd@{}\n  default_backend b\nbackend b\n  server e {epoxy} send-proxy-v2\n",
        l.as_raw_fd()
    );
    std::fs::write(d.join("haproxy.cfg"), conf).expect("write haproxy.cfg");
    let log = std::fs::File::create(d.join("haproxy.log")).expect("haproxy log");
    let child = Command::new(bin)
        .arg("-db")
        .arg("-f")
        .arg(d.join("haproxy.cfg"))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("start haproxy");
    let _haproxy = Peer {
        child,
        what: "haproxy",
    };
    let mut c = connect_from("127.0.0.9", front);
    let me = c.local_addr().expect("local");
    if roundtrip(&mut c, b"through haproxy and epoxy", scaled_secs(10)).is_err() {
        panic!(
            "no echo through haproxy; haproxy said:\n{}\nepoxy said:\n{}",
            std::fs::read_to_string(d.join("haproxy.log")).unwrap_or_default(),
            p.proxy.stderr_text()
        );
    }
    let admin = p.admin.expect("admin");
    let (code, body) = http_get(admin, "/connections").expect("/connections");
    assert_eq!(code, 200);
    assert!(
        body.contains(&format!("\"client\":\"{me}\"")),
        "/connections should show HAProxy's client {me}: {body}"
    );
}

fn v1_header(src: &str, dst: &str) -> Vec<u8> {
    let (s, d): (SocketAddr, SocketAddr) = (src.parse().expect("src"), dst.parse().expect("dst"));
    format!(
        "PROXY TCP4 {} {} {} {}\r\n",
        s.ip(),
        d.ip(),
        s.port(),
        d.port()
    )
    .into_bytes()
}

#[test]
fn accept_proxy_header_byte_by_byte_then_payload_is_forwarded() {
    let echo = echo_server();
    let p = start_one_app(
        "bb",
        true,
        &format!("targets = [\"{}\"]\naccept_proxy = true\n", echo.addr()),
    );
    let mut c = TcpStream::connect(p.app_addr("bb")).expect("connect");
    c.set_nodelay(true).expect("nodelay");
    c.set_read_timeout(Some(scaled_secs(10))).expect("timeout");
    let hdr = v1_header("192.0.2.10:4242", "198.51.100.1:443");
    for b in &hdr {
        c.write_all(std::slice::from_ref(b)).expect("one byte");
        std::thread::sleep(Duration::from_millis(2)); // pacing only: separate segments
    }
    assert_echo(&mut c, b"after the header");
    // Header and first payload in one segment: the payload is kept.
    let mut c2 = TcpStream::connect(p.app_addr("bb")).expect("connect");
    c2.set_read_timeout(Some(scaled_secs(10))).expect("timeout");
    let mut msg = v1_header("192.0.2.11:4243", "198.51.100.1:443");
    msg.extend_from_slice(b"same segment");
    c2.write_all(&msg).expect("write");
    let mut got = [0u8; 12];
    c2.read_exact(&mut got).expect("echo");
    assert_eq!(&got, b"same segment");
    let (_, body) = http_get(p.admin.expect("admin"), "/connections").expect("/connections");
    assert!(body.contains("192.0.2.10:4242"), "{body}");
    assert!(body.contains("192.0.2.11:4243"), "{body}");
}

#[test]
fn missing_or_malformed_proxy_header_is_closed_without_a_byte_upstream() {
    let backend = CountingServer::start();
    let p = start_one_app(
        "mh",
        true,
        &format!(
            "targets = [\"{}\"]\naccept_proxy = true\nproxy_header_timeout = \"300ms\"\n",
            backend.addr()
        ),
    );
    let addr = p.app_addr("mh");
    // Silent client: closed at the timeout, not before.
    let mut silent = TcpStream::connect(addr).expect("connect");
    let t0 = Instant::now();
    match wait_closed(&mut silent, scaled_secs(10)) {
        Ok((_, 0)) => {}
        other => panic!("silent client: {other:?}"),
    }
    assert!(
        t0.elapsed() >= Duration::from_millis(250),
        "closed before the timeout"
    );
    // Garbage: closed at once, nothing sent back.
    for garbage in [
        &b"GET / HTTP/1.1\r\n\r\n"[..],
        b"PROXY TCP4 1.2.3.4\r\n",
        b"\r\n\r\n\0\r\nQUIT\n\x99",
    ] {
        let mut c = TcpStream::connect(addr).expect("connect");
        c.write_all(garbage).expect("write");
        match wait_closed(&mut c, scaled_secs(2).max(Duration::from_secs(2))) {
            Ok((_, 0)) => {}
            other => panic!("{garbage:?}: {other:?}"),
        }
    }
    assert_eq!(backend.accepted(), 0, "a refused client reached the target");
    let text = metrics_text(p.admin.expect("admin"));
    let closed = metric(
        &text,
        "epoxy_closes_total",
        &[("app", "mh"), ("reason", "proxy_header")],
    );
    assert_eq!(closed, Some(4.0), "{text}");
}

#[test]
fn allow_and_deny_decide_by_source_deny_wins() {
    let echo = echo_server();
    let mut listen = vec![format!("\"{}\"", any_port(1))];
    let v6 = ipv6_available();
    if v6 {
        listen.push("\"[::1]:0\"".into());
    }
    let p = super::util::cfg::start_cfg(
        "toml",
        listen.len(),
        &[],
        true,
        &format!(
            "[[app]]\nname = \"acl\"\nlisten = [{}]\ntargets = [\"{}\"]\nallow = [\"127.0.0.0/8\"]\ndeny = [\"127.0.0.3\", \"127.0.0.64/26\"]\n",
            listen.join(", "),
            echo.addr()
        ),
    );
    let v4 = p.addr(0);
    for (src, allowed) in [
        ("127.0.0.2", true),
        ("127.0.0.3", false),
        ("127.0.0.63", true),
        ("127.0.0.64", false),
        ("127.0.0.127", false),
        ("127.0.0.128", true),
    ] {
        let mut c = connect_from(src, v4);
        if allowed {
            assert_echo(&mut c, src.as_bytes());
        } else {
            let _ = c.write_all(b"x");
            match wait_closed(&mut c, scaled_secs(5)) {
                Ok((_, 0)) => {}
                other => panic!("{src} should be refused: {other:?}"),
            }
        }
    }
    let mut refused = 3.0;
    if v6 {
        // ::1 is in no allow entry: refused.
        let mut c = connect_from("::1", p.addr(1));
        let _ = c.write_all(b"x");
        assert!(matches!(wait_closed(&mut c, scaled_secs(5)), Ok((_, 0))));
        refused += 1.0;
    }
    let text = metrics_text(p.admin.expect("admin"));
    assert_eq!(
        metric(&text, "epoxy_acl_denied_total", &[("app", "acl")]),
        Some(refused),
        "{text}"
    );
}

#[test]
fn per_source_cap_refuses_the_next_and_frees_on_close() {
    let echo = echo_server();
    let p = start_one_app(
        "ps",
        true,
        &format!(
            "targets = [\"{}\"]\nmax_conns_per_source = 2\n",
            echo.addr()
        ),
    );
    let addr = p.app_addr("ps");
    let mut a1 = connect_from("127.0.0.2", addr);
    let mut a2 = connect_from("127.0.0.2", addr);
    assert_echo(&mut a1, b"a1");
    assert_echo(&mut a2, b"a2");
    let mut a3 = connect_from("127.0.0.2", addr);
    let _ = a3.write_all(b"a3");
    match wait_closed(&mut a3, scaled_secs(5)) {
        Ok((_, 0)) => {}
        other => panic!("third from one source should be refused: {other:?}"),
    }
    let mut b1 = connect_from("127.0.0.3", addr);
    assert_echo(&mut b1, b"another source");
    drop(a1);
    // The slot frees when the pair closes: a new client from .2 gets through.
    let ok = wait_until(scaled_secs(10), || {
        let mut c = connect_from("127.0.0.2", addr);
        roundtrip(&mut c, b"again", scaled_secs(2)).is_ok_and(|r| r == b"again")
    });
    assert!(ok, "the freed slot was not given back");
    let text = metrics_text(p.admin.expect("admin"));
    assert!(
        metric(&text, "epoxy_source_limited_total", &[("app", "ps")]).is_some_and(|n| n >= 1.0),
        "{text}"
    );
}

/// `openssl s_server -www` with a certificate for `cn`, on 127.0.0.1:0 (the port it prints).
fn tls_server(dir: &Path, cn: &str) -> (Peer, SocketAddr) {
    let openssl = need("openssl", "openssl");
    let (key, cert) = (dir.join(format!("{cn}.key")), dir.join(format!("{cn}.crt")));
    let st = Command::new(&openssl)
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .arg("-subj")
        .arg(format!("/CN={cn}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .expect("openssl req");
    assert!(st.success(), "openssl req failed");
    let mut child = Command::new(&openssl)
        .args(["s_server", "-accept", "127.0.0.1:0", "-www"])
        .arg("-cert")
        .arg(&cert)
        .arg("-key")
        .arg(&key)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("openssl s_server");
    let mut out = child.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut line = Vec::new();
        let mut b = [0u8; 1];
        while out.read(&mut b).is_ok_and(|n| n == 1) {
            if b[0] == b'\n' {
                let l = String::from_utf8_lossy(&line).to_string();
                if let Some(a) = l.strip_prefix("ACCEPT ") {
                    let _ = tx.send(a.trim().to_string());
                }
                line.clear();
            } else {
                line.push(b[0]);
            }
        }
    });
    let addr = rx
        .recv_timeout(scaled_secs(10))
        .expect("s_server printed no ACCEPT line")
        .parse()
        .expect("ACCEPT address");
    (
        Peer {
            child,
            what: "openssl s_server",
        },
        addr,
    )
}

/// `openssl s_client -servername NAME`: the subject CN of the certificate it got.
fn tls_subject(addr: SocketAddr, name: Option<&str>) -> String {
    let openssl = need("openssl", "openssl");
    let mut cmd = Command::new(openssl);
    cmd.args(["s_client", "-connect"]).arg(addr.to_string());
    match name {
        Some(n) => cmd.args(["-servername", n]),
        None => cmd.arg("-noservername"),
    };
    let out = cmd
        .stdin(Stdio::null())
        .stderr(Stdio::null())
        .output()
        .expect("openssl s_client");
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("subject=").map(|s| s.trim().to_string()))
        .unwrap_or_else(|| {
            format!(
                "<no certificate: {}>",
                text.lines().take(3).collect::<Vec<_>>().join(" | ")
            )
        })
}

#[test]
fn sni_routes_pass_tls_through_to_the_matching_server() {
    let dir = temp_dir("tls");
    let (_api, api) = tls_server(&dir, "api.example.com");
    let (_wild, wild) = tls_server(&dir, "wild.example.com");
    let (_def, def) = tls_server(&dir, "default.example.net");
    let p = start_one_app(
        "sni",
        true,
        &format!(
            "targets = [\"{def}\"]\naccess_log = true\nroutes = [\n  {{ sni = [\"api.example.com\"], targets = [\"{api}\"] }},\n  {{ sni = [\"*.example.com\"], targets = [\"{wild}\"] }},\n]\n"
        ),
    );
    let addr = p.app_addr("sni");
    for (name, cn) in [
        (Some("api.example.com"), "api.example.com"),
        (Some("API.Example.COM."), "api.example.com"),
        (Some("x.y.example.com"), "wild.example.com"),
        (Some("example.org"), "default.example.net"),
        (None, "default.example.net"),
    ] {
        let subject = tls_subject(addr, name);
        assert!(
            subject.contains(cn),
            "{name:?}: expected {cn}, got {subject}"
        );
    }
}

#[test]
fn sni_required_closes_plain_clients() {
    let echo = echo_server();
    let other = echo_server();
    let p = start_one_app(
        "snr",
        true,
        &format!(
            "targets = [\"{}\"]\nsni_required = true\nproxy_header_timeout = \"500ms\"\nroutes = [{{ sni = [\"a.test\"], targets = [\"{}\"] }}]\n",
            echo.addr(),
            other.addr()
        ),
    );
    let mut c = TcpStream::connect(p.app_addr("snr")).expect("connect");
    c.write_all(b"plain text, not TLS").expect("write");
    match wait_closed(&mut c, scaled_secs(5)) {
        Ok((_, 0)) => {}
        other => panic!("plain client should be closed: {other:?}"),
    }
    assert_eq!(echo.accepted() + other.accepted(), 0);
    let text = metrics_text(p.admin.expect("admin"));
    assert_eq!(
        metric(
            &text,
            "epoxy_closes_total",
            &[("app", "snr"), ("reason", "sni_required")]
        ),
        Some(1.0),
        "{text}"
    );
}
