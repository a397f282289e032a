//! The `proxy` binary: flags -> configuration -> run -> exit code (0 clean, 1 runtime failure,
//! 2 usage/config error). The lifecycle (signals, drain, reload, summary) is the library's
//! (`control.rs`).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use epoxy::cli::{Cli, Subcommands};
use epoxy::control::Lifecycle;
use epoxy::pidfile::PidFile;
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
    match &cli.command {
        Some(Subcommands::Completions(args)) => {
            return ExitCode::from(print_stdout(&epoxy::cli::completion_script(args.shell)));
        }
        Some(Subcommands::Manpage) => {
            return match epoxy::cli::manpage() {
                Ok(page) => ExitCode::from(print_stdout(&page)),
                Err(e) => {
                    eprintln!("proxy: render the man page: {e}");
                    ExitCode::from(1)
                }
            };
        }
        Some(Subcommands::Selftest(_)) | None => {}
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
        let config = cli.to_config()?;
        let text = format!("{}ok\n", epoxy::config::describe(&config));
        return Ok(print_stdout(text.as_bytes()));
    }
    // Signals first, so a signal during start-up is not lost to the default handler.
    let mut life = Lifecycle::with_signals()?;
    // Listening sockets from an old process (SIGUSR2 upgrade) or from systemd.
    let (old, inherited) = match Predecessor::from_env()? {
        Some((old, sockets)) => (Some(old), sockets),
        None => (None, Inherited::from_systemd()?),
    };
    // The pid file: after the handlers, so that whoever reads the PID and signals it finds
    // them; a process started by an upgrade writes it only once it owns the listeners (until
    // then the file names the old process, which keeps serving if this one fails). One that
    // cannot be written is a runtime failure (exit 1), like a port that cannot be bound: the
    // flags are well-formed, the host refuses. Held until `run` returns (after the summary).
    let mut _pid_file = None;
    if old.is_none() {
        _pid_file = cli.pid_file.as_deref().map(PidFile::create).transpose()?;
    }
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
            _pid_file = cli.pid_file.as_deref().map(PidFile::create).transpose()?;
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

/// Write `bytes` to stdout; the exit status: 0, or 1 with a message if stdout fails (a closed
/// pipe, as in `proxy manpage | head`, is not worth one).
fn print_stdout(bytes: &[u8]) -> u8 {
    let mut out = std::io::stdout().lock();
    match out.write_all(bytes).and_then(|()| out.flush()) {
        Ok(()) => 0,
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => 0,
        Err(e) => {
            eprintln!("proxy: write to stdout: {e}");
            1
        }
    }
}
