//! The integration-test binary of epoxy: it runs the real `proxy` binary against servers
//! started in this process (see `util`). The allocation test lives apart in `alloc.rs`
//! because it installs its own global allocator.

mod admin_abuse;
mod config_check;
mod core;
mod deploy;
mod edge;
mod fuzz_corpus;
mod migrate;
mod observe;
mod routing;
mod scale;
mod selftest;
mod splice_auto;
mod stats_page;
mod tools;
mod upgrade;
// Shared helpers; each test module uses only some of them.
#[allow(dead_code)]
mod util;
