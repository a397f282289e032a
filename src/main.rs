//! The `proxy` binary: parse the CLI, load the configuration, start the runtime, handle
//! signals (SIGTERM/SIGINT drain, a second one stops at once; SIGHUP reload), print the final
//! summary and map errors to exit codes (0 clean, 1 runtime failure, 2 usage/config error).

use std::process::ExitCode;

use clap::Parser;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use epoxy::cli::Cli;
use epoxy::control::CONTROL_TICK;
use epoxy::{Error, Proxy};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info")).init();
    match run(&cli) {
        Ok(code) => ExitCode::from(code),
        Err(e) => {
            eprintln!("proxy: {e}");
            ExitCode::from(e.exit_code() as u8)
        }
    }
}

fn run(cli: &Cli) -> Result<u8, Error> {
    let config = cli.to_config()?;
    if cli.check {
        println!("ok");
        return Ok(0);
    }
    // Signals first, so a signal during start-up is not lost to the default handler.
    let mut signals =
        Signals::new([SIGINT, SIGTERM, SIGHUP]).map_err(|e| Error::io("install signal handlers", e))?;
    let mut poll = Poll::new().map_err(|e| Error::io("create control poll", e))?;
    poll.registry()
        .register(&mut signals, Token(0), Interest::READABLE)
        .map_err(|e| Error::io("register signals", e))?;
    let proxy = Proxy::start(config)?;
    let mut events = Events::with_capacity(8);
    let mut draining = false;
    while !proxy.is_finished() {
        if let Err(e) = poll.poll(&mut events, Some(CONTROL_TICK)) {
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(Error::io("poll signals", e));
            }
        }
        for sig in signals.pending() {
            match sig {
                SIGINT | SIGTERM if draining => {
                    log::info!("second signal: closing all connections now");
                    proxy.stop_now();
                }
                SIGINT | SIGTERM => {
                    draining = true;
                    log::info!(
                        "shutting down: not accepting; waiting up to {:?} for live connections",
                        proxy.config().grace
                    );
                    proxy.shutdown();
                }
                SIGHUP => log::warn!("SIGHUP: reload is not available yet; ignoring"),
                _ => {}
            }
        }
    }
    let (summary, failures) = proxy.join_with_failures();
    eprint!("{summary}");
    if failures.is_empty() {
        Ok(0)
    } else {
        for f in &failures {
            eprintln!("proxy: {f}");
        }
        Ok(1)
    }
}
