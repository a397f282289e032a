//! The `proxy` binary: parse the CLI, load the configuration, start the runtime, handle
//! signals (SIGTERM/SIGINT drain, a second one stops at once; SIGHUP reload), print the final
//! summary and map errors to exit codes (0 clean, 1 runtime failure, 2 usage/config error).

use std::process::ExitCode;
use std::time::Instant;

use clap::Parser;
use mio::{Events, Interest, Poll, Token};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook_mio::v1_0::Signals;

use epoxy::cli::Cli;
use epoxy::control::CONTROL_TICK;
use epoxy::stats::Summary;
use epoxy::{Error, Proxy, config};

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
    let mut signals = Signals::new([SIGINT, SIGTERM, SIGHUP])
        .map_err(|e| Error::io("install signal handlers", e))?;
    let mut poll = Poll::new().map_err(|e| Error::io("create control poll", e))?;
    poll.registry()
        .register(&mut signals, Token(0), Interest::READABLE)
        .map_err(|e| Error::io("register signals", e))?;
    let mut proxy = Proxy::start(config)?;
    let mut events = Events::with_capacity(8);
    let mut draining = false;
    let mut drain_at: Option<Instant> = None;
    let mut last_log = (Instant::now(), proxy.summary());
    while !proxy.is_finished() {
        if let Err(e) = poll.poll(&mut events, Some(CONTROL_TICK))
            && e.kind() != std::io::ErrorKind::Interrupted
        {
            return Err(Error::io("poll signals", e));
        }
        for sig in signals.pending() {
            match sig {
                SIGINT | SIGTERM if draining => {
                    log::info!("second signal: closing all connections now");
                    proxy.stop_now();
                }
                SIGINT | SIGTERM => {
                    draining = true;
                    let delay = proxy.config().drain_delay;
                    proxy.begin_drain();
                    if delay.is_zero() {
                        proxy.shutdown();
                        log_listeners_closed(&proxy);
                    } else {
                        log::info!("shutting down: readyz now 503; listeners close in {delay:?}");
                        drain_at = Some(Instant::now() + delay);
                    }
                }
                SIGHUP => reload(cli, &mut proxy),
                _ => {}
            }
        }
        if drain_at.is_some_and(|t| Instant::now() >= t) {
            drain_at = None;
            proxy.shutdown();
            log_listeners_closed(&proxy);
        }
        if let Some(every) = proxy.config().log_interval
            && last_log.0.elapsed() >= every
        {
            last_log = log_periodic(&proxy, &last_log);
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

/// SIGHUP: re-read the file; on any error keep the running configuration.
fn reload(cli: &Cli, proxy: &mut Proxy) {
    let Some(path) = proxy.config().source.clone() else {
        log::warn!("SIGHUP: started without a config file (-c); nothing to reload");
        return;
    };
    log::info!("SIGHUP: reloading {}", path.display());
    match config::load_file(&path, &cli.overrides()) {
        Ok(new) => {
            if let Err(e) = proxy.reload(new) {
                log::error!("reload failed: {e}; keeping the running configuration");
            }
        }
        Err(e) => {
            proxy.count_failed_reload();
            log::error!("reload failed: {e}; keeping the running configuration");
        }
    }
}

/// The periodic traffic line; returns the new reference point.
fn log_periodic(proxy: &Proxy, last: &(Instant, Summary)) -> (Instant, Summary) {
    let now = Instant::now();
    let s = proxy.summary();
    let secs = now.duration_since(last.0).as_secs_f64().max(1e-3);
    let rate = |a: u64, b: u64| a.saturating_sub(b) as f64 / secs;
    let active = proxy.state().shared.active();
    let idle = active == 0
        && s.accepted == last.1.accepted
        && s.bytes_client_to_upstream == last.1.bytes_client_to_upstream
        && s.bytes_upstream_to_client == last.1.bytes_upstream_to_client;
    if idle {
        // Nothing happened: no line (an idle proxy should not fill its log).
        return (now, s);
    }
    log::info!(
        "stats: active {} total {} ({:.1}/s), bytes client->upstream {} ({:.0} B/s), upstream->client {} ({:.0} B/s)",
        active,
        s.accepted,
        rate(s.accepted, last.1.accepted),
        s.bytes_client_to_upstream,
        rate(s.bytes_client_to_upstream, last.1.bytes_client_to_upstream),
        s.bytes_upstream_to_client,
        rate(s.bytes_upstream_to_client, last.1.bytes_upstream_to_client),
    );
    (now, s)
}

fn log_listeners_closed(proxy: &Proxy) {
    log::info!(
        "shutting down: listeners closed; {} live connection(s) get up to {:?}",
        proxy.state().shared.active(),
        proxy.config().grace
    );
}
