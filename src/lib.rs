//! epoxy: a Linux TCP (layer 4) proxy and load balancer built on a hand-rolled,
//! edge-triggered mio event loop. The binary `proxy` is a thin shell over this library;
//! tests, benchmarks and other programs embed it through [`Proxy`] and [`Config`].
#![deny(unsafe_code)]

pub mod backend;
pub mod balance;
pub mod buffer;
pub mod cli;
pub mod config;
pub mod control;
pub mod error;
pub mod health;
pub mod metrics;
pub mod net;
pub mod stats;
pub mod sys;
pub mod worker;

pub use config::Config;
pub use control::Proxy;
pub use error::Error;
