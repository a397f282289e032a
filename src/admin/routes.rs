//! The admin routes: `/metrics` (Prometheus text, or JSON with `?format=json`), `/stats` (the
//! HTML page, or its JSON with `?format=json`), `/connections`, `/healthz`, `/readyz`;
//! anything else 404, methods other than GET/HEAD 405. Pure: a request and the shared view in,
//! a response out (the server does the I/O).

use super::http::{self, Method, Request, Response};
use super::server::Shared;
use super::{page, render};

/// Answer one request.
pub fn handle(req: &Request, shared: &Shared) -> Response {
    let view = &shared.view;
    if req.method == Method::Other {
        return Response::text(405, "method not allowed");
    }
    match req.path.as_str() {
        "/metrics" if req.has_query("format=json") => {
            Response::new(200, http::JSON, render::json(view).to_string())
        }
        "/metrics" => {
            let mut text = render::prometheus(view);
            render::admin_families(&mut text, &shared.counters);
            Response::new(200, http::PROMETHEUS, text)
        }
        "/stats" if req.has_query("format=json") => {
            Response::new(200, http::JSON, page::stats_json(shared).to_string())
        }
        "/stats" => Response::new(200, http::HTML, page::html(shared)),
        "/connections" => Response::new(200, http::JSON, render::connections(view).to_string()),
        "/healthz" => Response::text(200, "ok"),
        "/readyz" if view.serving() => Response::text(200, "ready"),
        "/readyz" => Response::text(503, "draining"),
        _ => Response::text(404, "not found"),
    }
}
