//! The `proxy` binary: flags -> configuration -> run -> exit code (0 clean, 1 runtime failure,
//! 2 usage/config error). The lifecycle (signals, drain, reload, summary) is the library's
//! (`control.rs`).

use std::io::Write;
use std::process::ExitCode;

use clap::Parser;

use epoxy::cli::{Cli, Subcommands};
use epoxy::control::Lifecycle;
use epoxy::pidfile::PidFile;
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
    let config = cli.to_config()?;
    if cli.check {
        let text = format!("{}ok\n", epoxy::config::describe(&config));
        return Ok(print_stdout(text.as_bytes()));
    }
    // Signals first, so a signal during start-up is not lost to the default handler.
    let life = Lifecycle::with_signals()?;
    // After the handlers, so that whoever reads the PID and signals it finds them. A pid file
    // that cannot be written is a runtime failure (exit 1), like a port that cannot be bound:
    // the flags are well-formed, the host refuses. Held until `run` returns (after the summary).
    let _pid_file = cli.pid_file.as_deref().map(PidFile::create).transpose()?;
    let done = Proxy::start(config)?.serve(life, &cli.overrides())?;
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
