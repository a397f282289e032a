//! The admin's HTTP/1.x on the wire: parsing a request head out of the bytes read so far
//! (with the size limits the server enforces) and encoding a response. Pure functions over
//! bytes, no sockets. Only what the admin needs: a request line and header lines, no body,
//! one request per connection (every response says `Connection: close`).

/// Longest request line (method, target, version) accepted: 414 beyond.
pub const MAX_REQUEST_LINE: usize = 8 * 1024;
/// Longest request head (request line and every header line) accepted: 431 beyond.
pub const MAX_HEAD: usize = 16 * 1024;

/// A request method as far as the admin cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Method {
    Get,
    Head,
    /// Any other well-formed method (answered 405).
    Other,
}

/// A parsed request head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    pub method: Method,
    /// The path of the request target (before `?`).
    pub path: String,
    /// The query (after `?`; empty when there is none).
    pub query: String,
}

impl Request {
    /// Whether `key=value` is one of the query's `&`-separated pairs.
    pub fn has_query(&self, pair: &str) -> bool {
        self.query.split('&').any(|kv| kv == pair)
    }
}

/// What the bytes read so far amount to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parse {
    /// A valid prefix of a request head: read more.
    Incomplete,
    /// A complete, valid request head.
    Done(Request),
    /// Not HTTP the admin accepts: answer this status with this reason, then close.
    Reject(u16, &'static str),
}

fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// Bytes that may appear in a request head at all (visible ASCII, space, tab, CR, LF, and
/// obs-text in header values).
fn is_head_byte(b: u8) -> bool {
    matches!(b, b'\t' | b'\r' | b'\n' | 0x20..=0x7e | 0x80..=0xff)
}

fn parse_request_line(line: &[u8]) -> Result<Request, (u16, &'static str)> {
    let bad = (400, "malformed request line");
    let text = std::str::from_utf8(line).map_err(|_| bad)?;
    let mut parts = text.split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(bad);
    };
    if method.is_empty() || method.len() > 32 || !method.bytes().all(is_tchar) {
        return Err(bad);
    }
    if !target.starts_with('/') || !target.bytes().all(|b| (0x21..=0x7e).contains(&b)) {
        return Err((400, "malformed request target"));
    }
    if version != "HTTP/1.1" && version != "HTTP/1.0" {
        return Err((505, "HTTP version not supported"));
    }
    let method = match method {
        "GET" => Method::Get,
        "HEAD" => Method::Head,
        _ => Method::Other,
    };
    let (path, query) = target.split_once('?').unwrap_or((target, ""));
    Ok(Request {
        method,
        path: path.to_string(),
        query: query.to_string(),
    })
}

/// One header line (without its line end): `name: value`, name a token.
fn header_line_ok(line: &[u8]) -> bool {
    match line.iter().position(|&b| b == b':') {
        Some(0) | None => false,
        Some(i) => line[..i].iter().all(|&b| is_tchar(b)),
    }
}

/// Strip one trailing `\r`.
fn trim_cr(line: &[u8]) -> &[u8] {
    line.strip_suffix(b"\r").unwrap_or(line)
}

/// Parse the bytes received so far on a connection. Garbage is rejected as soon as it is
/// seen (not only once a blank line arrives), and the limits hold whatever has been sent.
pub fn parse(buf: &[u8]) -> Parse {
    if buf.iter().any(|&b| !is_head_byte(b)) {
        return Parse::Reject(400, "invalid byte in request");
    }
    let Some(nl) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > MAX_REQUEST_LINE {
            return Parse::Reject(414, "request line too long");
        }
        if buf.iter().any(|&b| b >= 0x80) {
            return Parse::Reject(400, "malformed request line");
        }
        return Parse::Incomplete;
    };
    if nl > MAX_REQUEST_LINE {
        return Parse::Reject(414, "request line too long");
    }
    let req = match parse_request_line(trim_cr(&buf[..nl])) {
        Ok(r) => r,
        Err((code, why)) => return Parse::Reject(code, why),
    };
    let mut pos = nl + 1;
    loop {
        let rest = &buf[pos.min(buf.len())..];
        let Some(len) = rest.iter().position(|&b| b == b'\n') else {
            return if buf.len() > MAX_HEAD {
                Parse::Reject(431, "request header fields too large")
            } else {
                Parse::Incomplete
            };
        };
        let end = pos + len + 1;
        if end > MAX_HEAD {
            return Parse::Reject(431, "request header fields too large");
        }
        let line = trim_cr(&rest[..len]);
        if line.is_empty() {
            return Parse::Done(req);
        }
        if !header_line_ok(line) {
            return Parse::Reject(400, "malformed header line");
        }
        pos = end;
    }
}

/// A response to encode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: impl Into<Vec<u8>>) -> Response {
        Response {
            status,
            content_type,
            body: body.into(),
        }
    }

    /// A plain-text error or status answer.
    pub fn text(status: u16, body: &str) -> Response {
        Response::new(status, TEXT, format!("{body}\n"))
    }
}

pub const TEXT: &str = "text/plain; charset=utf-8";
pub const JSON: &str = "application/json";
pub const HTML: &str = "text/html; charset=utf-8";
pub const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        505 => "HTTP Version Not Supported",
        _ => "Unknown",
    }
}

/// The bytes of `resp` on the wire (without the body for HEAD).
pub fn encode(resp: &Response, head_only: bool) -> Vec<u8> {
    let mut head = format!(
        "HTTP/1.1 {} {}\r\nContent-Type: {}\r\nContent-Length: {}\r\nConnection: close\r\nCache-Control: no-store\r\nX-Content-Type-Options: nosniff\r\n",
        resp.status,
        reason(resp.status),
        resp.content_type,
        resp.body.len()
    );
    if resp.status == 405 {
        head.push_str("Allow: GET, HEAD\r\n");
    }
    if resp.content_type == HTML {
        head.push_str(
            "Content-Security-Policy: default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; img-src data:\r\n",
        );
    }
    head.push_str("\r\n");
    let mut out = head.into_bytes();
    if !head_only {
        out.extend_from_slice(&resp.body);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn done(s: &str) -> Request {
        match parse(s.as_bytes()) {
            Parse::Done(r) => r,
            other => panic!("{s:?}: {other:?}"),
        }
    }

    #[test]
    fn requests_parse() {
        let r = done("GET /metrics?format=json HTTP/1.1\r\nHost: x\r\n\r\n");
        assert_eq!(r.method, Method::Get);
        assert_eq!(r.path, "/metrics");
        assert!(r.has_query("format=json"));
        assert_eq!(done("HEAD / HTTP/1.0\n\n").method, Method::Head);
        assert_eq!(done("POST /x HTTP/1.0\r\n\r\n").method, Method::Other);
        assert!(matches!(
            parse(b"GET /s HTTP/1.1\r\nA: \x80\r\n\r\n"),
            Parse::Done(_)
        ));
    }

    #[test]
    fn prefixes_are_incomplete() {
        let full = b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n";
        for n in 0..full.len() {
            assert_eq!(parse(&full[..n]), Parse::Incomplete, "{n}");
        }
    }

    #[test]
    fn garbage_is_rejected_early() {
        for g in [
            &b"\x16\x03\x01\x02\x00"[..],
            b"hello world\r\n",
            b"GET metrics HTTP/1.1\r\n",
            b"GET /a b HTTP/1.1\r\n",
            b"GET / HTTP/1.1\r\nno colon\r\n",
            b"GET / HTTP/1.1\r\n: empty\r\n",
            b"GET / HTTP/1.1\r\n folded\r\n",
            b"\xff\xfe",
        ] {
            assert!(
                matches!(parse(g), Parse::Reject(400, _)),
                "{g:?}: {:?}",
                parse(g)
            );
        }
        assert!(matches!(
            parse(b"GET / HTTP/2.0\r\n\r\n"),
            Parse::Reject(505, _)
        ));
    }

    #[test]
    fn limits_hold() {
        let long_line = format!("GET /{} HTTP/1.1", "a".repeat(MAX_REQUEST_LINE));
        assert!(matches!(parse(long_line.as_bytes()), Parse::Reject(414, _)));
        let no_nl = "a".repeat(MAX_REQUEST_LINE + 1);
        assert!(matches!(parse(no_nl.as_bytes()), Parse::Reject(414, _)));
        let big = format!("GET / HTTP/1.1\r\nX: {}\r\n", "b".repeat(MAX_HEAD));
        assert!(matches!(parse(big.as_bytes()), Parse::Reject(431, _)));
        let big_partial = format!("GET / HTTP/1.1\r\nX: {}", "b".repeat(MAX_HEAD));
        assert!(matches!(
            parse(big_partial.as_bytes()),
            Parse::Reject(431, _)
        ));
    }

    #[test]
    fn responses_encode() {
        let r = Response::text(404, "not found");
        let out = String::from_utf8(encode(&r, false)).unwrap_or_default();
        assert!(out.starts_with("HTTP/1.1 404 Not Found\r\n"), "{out}");
        assert!(out.contains("Content-Length: 10\r\n"), "{out}");
        assert!(out.ends_with("\r\n\r\nnot found\n"), "{out}");
        let head = String::from_utf8(encode(&r, true)).unwrap_or_default();
        assert!(head.ends_with("\r\n\r\n"), "{head}");
    }
}
