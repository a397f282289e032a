//! epoxy: a Linux TCP (layer 4) proxy and load balancer built on a hand-rolled,
//! edge-triggered mio event loop. The binary `proxy` is a thin shell over this library;
//! tests, benchmarks and other programs embed it through [`Proxy`] and [`Config`]:
//!
//! ```no_run
//! use epoxy::config::{AppConfig, Config, TargetConfig};
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let target = TargetConfig::new("127.0.0.1:8081".parse()?);
//! let app = AppConfig::new("web", vec!["127.0.0.1:8080".parse()?], vec![target]);
//! let config = Config { apps: vec![app], ..Config::default() };
//! let life = epoxy::Lifecycle::new()?; // or Lifecycle::with_signals()
//! let stop = life.handle(); // stop.shutdown() from any thread drains, like SIGTERM
//! let proxy = epoxy::Proxy::start(config)?;
//! # stop.shutdown();
//! let finished = proxy.serve(life, &Default::default())?;
//! eprint!("{}", finished.summary);
//! # Ok(()) }
//! ```
#![deny(unsafe_code)]
#![warn(clippy::undocumented_unsafe_blocks)]
#![cfg_attr(not(test), warn(clippy::unwrap_used, clippy::expect_used))]

pub mod access_log;
pub mod acl;
pub mod admin;
pub mod backend;
pub mod balance;
pub mod buffer;
pub mod cli;
pub mod config;
pub mod control;
pub mod error;
pub mod health;
pub mod migrate;
pub mod net;
pub mod outcome;
pub mod pidfile;
pub mod proxy_proto;
pub mod selftest;
pub mod sni;
pub mod source_limit;
pub mod stats;
pub mod sys;
pub mod upgrade;
pub mod worker;

pub use config::Config;
pub use control::{Finished, Lifecycle, Proxy, ShutdownHandle};
pub use error::Error;
