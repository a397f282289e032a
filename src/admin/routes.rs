//! The admin routes: `/metrics` (Prometheus text, or JSON with `?format=json`),
//! `/connections`, `/healthz`, `/readyz`; anything else 404, methods other than GET/HEAD 405.

use super::render;
use super::view::ProxyView;

const TEXT: &str = "text/plain; charset=utf-8";
const JSON: &str = "application/json";
const PROMETHEUS: &str = "text/plain; version=0.0.4; charset=utf-8";

fn header(name: &str, value: &str) -> Option<tiny_http::Header> {
    tiny_http::Header::from_bytes(name.as_bytes(), value.as_bytes()).ok()
}

fn respond(req: tiny_http::Request, code: u16, ctype: &str, body: String) {
    let mut resp = tiny_http::Response::from_string(body).with_status_code(code);
    if let Some(h) = header("Content-Type", ctype) {
        resp = resp.with_header(h);
    }
    if let Err(e) = req.respond(resp) {
        log::debug!("admin: respond: {e}");
    }
}

/// Answer one request.
pub fn handle(req: tiny_http::Request, view: &ProxyView) {
    let url = req.url().to_string();
    let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
    let is_get = matches!(
        req.method(),
        tiny_http::Method::Get | tiny_http::Method::Head
    );
    if !is_get {
        respond(req, 405, TEXT, "method not allowed\n".into());
        return;
    }
    match path {
        "/metrics" if query.split('&').any(|kv| kv == "format=json") => {
            respond(req, 200, JSON, render::json(view).to_string())
        }
        "/metrics" => respond(req, 200, PROMETHEUS, render::prometheus(view)),
        "/connections" => respond(req, 200, JSON, render::connections(view).to_string()),
        "/healthz" => respond(req, 200, TEXT, "ok\n".into()),
        "/readyz" if view.serving() => respond(req, 200, TEXT, "ready\n".into()),
        "/readyz" => respond(req, 503, TEXT, "draining\n".into()),
        _ => respond(req, 404, TEXT, "not found\n".into()),
    }
}
