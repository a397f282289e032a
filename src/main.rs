//! The `proxy` binary: flags -> configuration -> run -> exit code (0 clean, 1 runtime failure,
//! 2 usage/config error). The lifecycle (signals, drain, reload, summary) is the library's
//! (`control.rs`).

use std::process::ExitCode;

use clap::Parser;

use epoxy::cli::{Cli, Subcommands};
use epoxy::control::Lifecycle;
use epoxy::upgrade::{self, Inherited, Predecessor};
use epoxy::{Error, Proxy};

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    if let Some(Subcommands::Selftest(args)) = &cli.command {
        // Quiet by default: the checks start and stop proxies; the table is the output.
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("off")).init();
        let code = match &args.emfile_child {
            Some(backend) => epoxy::selftest::emfile_child(backend),
            None => epoxy::selftest::main(args.json),
        };
        return ExitCode::from(code);
    }
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
    if cli.check {
        cli.to_config()?;
        println!("ok");
        return Ok(0);
    }
    // Signals first, so a signal during start-up is not lost to the default handler.
    let mut life = Lifecycle::with_signals()?;
    // Listening sockets from an old process (SIGUSR2 upgrade) or from systemd.
    let (old, inherited) = match Predecessor::from_env()? {
        Some((old, sockets)) => (Some(old), sockets),
        None => (None, Inherited::from_systemd()?),
    };
    let started = cli
        .to_config()
        .map_err(Error::from)
        .and_then(|config| Proxy::start_with(config, inherited, old.is_some()));
    let mut proxy = match started {
        Ok(p) => p,
        Err(e) => {
            if let Some(old) = &old {
                old.fail(&e.to_string());
            }
            return Err(e);
        }
    };
    match old {
        Some(old) => {
            proxy.take_over(old)?;
            life.forget_upgrades()?;
        }
        None => upgrade::notify(&[sd_notify::NotifyState::Ready]),
    }
    let done = proxy.serve(life, &cli.overrides())?;
    eprint!("{}", done.summary);
    for f in &done.failures {
        eprintln!("proxy: {f}");
    }
    Ok(if done.failures.is_empty() { 0 } else { 1 })
}
