//! The integration-test binary of epoxy: it runs the real `proxy` binary against servers
//! started in this process (see `util`). The allocation test lives apart in `alloc.rs`
//! because it installs its own global allocator.

mod core;
mod util;
mod config_check;
