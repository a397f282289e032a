//! The admin HTTP endpoint: a bounded HTTP/1.1 server on its own threads (`server.rs`, with
//! the wire format in `http.rs`), the routes (`routes.rs`), the Prometheus/JSON rendering
//! (`render.rs`), the stats page (`page.rs`) with its five-minute traffic history
//! (`history.rs`), and the read-only view it serves (`view.rs`). Reads counters only; never
//! touches a worker's loop (live pairs come through the `LiveConnections` that control hands
//! it).

pub mod history;
pub mod http;
pub mod page;
pub mod render;
pub mod routes;
pub mod server;
pub mod view;

pub use server::{AdminCounters, AdminServer, FD_BUDGET, MAX_CONNECTIONS};
pub use view::{Carried, LiveConnections, MigrationCounts, ProxyView, ReloadCounts};
