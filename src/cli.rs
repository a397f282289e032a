//! Command-line definitions (clap) and their translation into a `Config`: either one app from
//! `-l -p -b -P`, or a config file (`-c`) with the flags as overrides. Both go through the
//! same `config` loading (`config::load_args` / `config::load_file`), so the same rules and
//! limits apply. Never resolves, validates beyond clap's value parsers, or starts anything.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, CommandFactory, Parser, Subcommand, ValueEnum};

use crate::config::{self, AppArgs, Config, ConfigError, MAX_CPU, MAX_WORKERS, Overrides, Workers};

/// epoxy: a TCP (layer 4) proxy and load balancer.
#[derive(Debug, Parser)]
#[command(name = "proxy", version, about, long_about = None)]
pub struct Cli {
    /// Address to listen on: IPv4/IPv6 literal (or a host name, resolved at start) [default: 0.0.0.0]
    #[arg(short = 'l', long, value_name = "ADDR", conflicts_with = "config")]
    pub listen: Option<String>,
    /// Port to listen on (0 = any free port) [default: 8080]
    #[arg(short = 'p', long, value_name = "PORT", conflicts_with = "config")]
    pub port: Option<u16>,
    /// Backend host: IPv4/IPv6 literal or host name, resolved at start [default: 127.0.0.1]
    #[arg(short = 'b', long, value_name = "HOST", conflicts_with = "config")]
    pub backend: Option<String>,
    /// Backend port [default: 8081]
    #[arg(short = 'P', long = "backend-port", value_name = "PORT",
          value_parser = clap::value_parser!(u16).range(1..), conflicts_with = "config")]
    pub backend_port: Option<u16>,
    /// Config file (.toml, .json or .conf); flags given too override it
    #[arg(short = 'c', long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Validate the configuration, print it resolved, then "ok", and exit (exit 2 on errors)
    #[arg(long)]
    pub check: bool,
    /// Most concurrent connection pairs, whole process [default: 10000, lowered to fit the fd limit]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..))]
    pub max_conns: Option<u64>,
    /// Bytes per relay buffer (one per direction while bytes are in flight) [default: 8192]
    #[arg(long, value_name = "BYTES", value_parser = clap::value_parser!(u64).range(1024..=16 * 1024 * 1024))]
    pub buffer_size: Option<u64>,
    /// Events per poll call [default: 128]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u64).range(1..=65536))]
    pub max_events: Option<u64>,
    /// Listen backlog [default: 1024]
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(i32).range(1..))]
    pub backlog: Option<i32>,
    /// Upstream connect timeout, e.g. 250ms, 5s [default: 5s]
    #[arg(long, value_name = "DUR", value_parser = parse_duration_on)]
    pub connect_timeout: Option<Duration>,
    /// Close pairs idle (no bytes either way) this long, or "off" [default: off]
    #[arg(long, value_name = "DUR", value_parser = parse_duration_opt)]
    pub idle_timeout: Option<OptDuration>,
    /// On SIGTERM/SIGINT, how long live connections may finish [default: 30s]
    #[arg(long, value_name = "DUR", value_parser = parse_duration_any)]
    pub grace: Option<Duration>,
    /// Worker threads: a number or "auto" (one per usable CPU) [default: 1]
    #[arg(long, value_name = "N|auto", value_parser = parse_workers)]
    pub workers: Option<Workers>,
    /// Pin worker i to the i-th CPU of this list, e.g. "0,2,4-7"
    #[arg(long, value_name = "LIST", value_parser = parse_cpu_list)]
    pub cpu_pin: Option<CpuList>,
    /// Serve /metrics, /connections, /healthz, /readyz on this address (e.g. 127.0.0.1:9090)
    #[arg(long, value_name = "ADDR")]
    pub admin: Option<SocketAddr>,
    /// Log one line per closed connection (target "access")
    #[arg(long)]
    pub access_log: bool,
    /// Relay every direction with splice(2) through kernel pipes instead of user-space
    /// buffers (the default, splice = "auto", does so only for bulk directions)
    #[arg(long, conflicts_with = "no_splice")]
    pub splice: bool,
    /// Never relay through kernel pipes, not even bulk directions (splice = false)
    #[arg(long)]
    pub no_splice: bool,
    /// On SIGTERM, keep listening this long after readyz turns 503 [default: 0s]
    #[arg(long, value_name = "DUR", value_parser = parse_duration_any)]
    pub drain_delay: Option<Duration>,
    /// Log a traffic summary this often, or "off" [default: 10s]
    #[arg(long, value_name = "DUR", value_parser = parse_duration_opt)]
    pub log_interval: Option<OptDuration>,
    /// Write the process ID to PATH at start (rewritten by a new process after a SIGUSR2
    /// upgrade; removed at exit if it still holds this PID)
    #[arg(long, value_name = "PATH")]
    pub pid_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Option<Subcommands>,
}

/// Subcommands (without one, `proxy` runs the proxy the flags describe).
#[derive(Debug, Subcommand)]
pub enum Subcommands {
    /// Check this host on loopback: half-close, resets, backpressure, EMFILE recovery,
    /// splice, SO_REUSEPORT, IPv6, fd and cgroup limits. Exit 0 when all needed checks pass
    Selftest(SelftestArgs),
    /// Print a shell completion script to stdout, e.g.
    /// `proxy completions bash > /etc/bash_completion.d/proxy`
    Completions(CompletionsArgs),
    /// Print the man page (roff) to stdout, e.g. `proxy manpage | man -l -`
    Manpage,
}

/// `proxy completions` arguments.
#[derive(Debug, Args)]
pub struct CompletionsArgs {
    /// The shell to complete for
    #[arg(value_enum)]
    pub shell: CompletionShell,
}

/// Shells `proxy completions` writes scripts for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum CompletionShell {
    Bash,
    Zsh,
    Fish,
}

/// The completion script for `shell`, as `proxy completions SHELL` prints it.
pub fn completion_script(shell: CompletionShell) -> Vec<u8> {
    let shell = match shell {
        CompletionShell::Bash => clap_complete::Shell::Bash,
        CompletionShell::Zsh => clap_complete::Shell::Zsh,
        CompletionShell::Fish => clap_complete::Shell::Fish,
    };
    let mut cmd = Cli::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut cmd, "proxy", &mut out);
    out
}

/// The man page (roff), as `proxy manpage` prints it.
pub fn manpage() -> std::io::Result<Vec<u8>> {
    let mut out = Vec::new();
    clap_mangen::Man::new(Cli::command()).render(&mut out)?;
    Ok(out)
}

/// `proxy selftest` flags.
#[derive(Debug, Args)]
pub struct SelftestArgs {
    /// Print the results as one JSON document
    #[arg(long)]
    pub json: bool,
    /// Internal: run the EMFILE check's child against this backend
    #[arg(long = "emfile-child", value_name = "ADDR", hide = true)]
    pub emfile_child: Option<String>,
}

/// A parsed duration that may be "off".
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptDuration(pub Option<Duration>);

/// A parsed CPU list.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpuList(pub Vec<usize>);

fn parse_duration_opt(s: &str) -> Result<OptDuration, String> {
    config::parse_duration(s).map(OptDuration)
}

fn parse_duration_any(s: &str) -> Result<Duration, String> {
    Ok(config::parse_duration(s)?.unwrap_or(Duration::ZERO))
}

fn parse_duration_on(s: &str) -> Result<Duration, String> {
    match config::parse_duration(s)? {
        Some(d) if !d.is_zero() => Ok(d),
        _ => Err(format!("'{s}' must be a positive duration")),
    }
}

fn parse_workers(s: &str) -> Result<Workers, String> {
    if s.eq_ignore_ascii_case("auto") {
        return Ok(Workers::Auto);
    }
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_WORKERS).contains(&n) => Ok(Workers::Count(n)),
        _ => Err(format!(
            "'{s}' is not a worker count (1-{MAX_WORKERS}) or \"auto\""
        )),
    }
}

/// "0,2,4-7" -> [0, 2, 4, 5, 6, 7].
pub fn parse_cpu_list(s: &str) -> Result<CpuList, String> {
    let mut out = Vec::new();
    for part in s.split(',') {
        let part = part.trim();
        let bad = || format!("invalid CPU list '{s}' (use e.g. 0,2,4-7)");
        if let Some((a, b)) = part.split_once('-') {
            let a: usize = a.trim().parse().map_err(|_| bad())?;
            let b: usize = b.trim().parse().map_err(|_| bad())?;
            if a > b || b > MAX_CPU {
                return Err(bad());
            }
            out.extend(a..=b);
        } else {
            let c: usize = part.parse().map_err(|_| bad())?;
            if c > MAX_CPU {
                return Err(bad());
            }
            out.push(c);
        }
    }
    if out.is_empty() {
        return Err(format!("empty CPU list '{s}'"));
    }
    Ok(CpuList(out))
}

impl Cli {
    /// Flags that override a config file.
    pub fn overrides(&self) -> Overrides {
        Overrides {
            workers: self.workers,
            cpu_pin: self.cpu_pin.as_ref().map(|c| c.0.clone()),
            max_conns: self.max_conns.map(|n| n as usize),
            buffer_size: self.buffer_size.map(|n| n as usize),
            max_events: self.max_events.map(|n| n as usize),
            backlog: self.backlog,
            connect_timeout: self.connect_timeout,
            idle_timeout: self.idle_timeout.map(|d| d.0),
            grace: self.grace,
            drain_delay: self.drain_delay,
            log_interval: self.log_interval.map(|d| d.0),
            admin: self.admin,
            access_log: self.access_log.then_some(true),
            splice: if self.no_splice {
                Some(false)
            } else {
                self.splice.then_some(true)
            },
        }
    }

    /// The configuration to run.
    pub fn to_config(&self) -> Result<Config, ConfigError> {
        let ov = self.overrides();
        if let Some(path) = &self.config {
            return config::load_file(path, &ov);
        }
        let defaults = AppArgs::default();
        let app = AppArgs {
            listen: self.listen.clone().unwrap_or(defaults.listen),
            port: self.port.unwrap_or(defaults.port),
            backend: self.backend.clone().unwrap_or(defaults.backend),
            backend_port: self.backend_port.unwrap_or(defaults.backend_port),
        };
        config::load_args(&app, &ov)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selftest_is_a_subcommand_and_flags_parse_as_before() {
        let cli = Cli::try_parse_from(["proxy", "selftest", "--json"]).map_err(|e| e.to_string());
        assert!(
            matches!(
                cli,
                Ok(Cli {
                    command: Some(Subcommands::Selftest(SelftestArgs { json: true, .. })),
                    ..
                })
            ),
            "{cli:?}"
        );
        let cli =
            Cli::try_parse_from(["proxy", "-p", "9000", "--check"]).map_err(|e| e.to_string());
        assert!(
            matches!(
                cli,
                Ok(Cli {
                    port: Some(9000),
                    check: true,
                    command: None,
                    ..
                })
            ),
            "{cli:?}"
        );
    }

    #[test]
    fn the_command_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn completions_and_manpage_are_subcommands() {
        let cli = Cli::try_parse_from(["proxy", "completions", "fish"]).map_err(|e| e.to_string());
        assert!(
            matches!(
                cli,
                Ok(Cli {
                    command: Some(Subcommands::Completions(CompletionsArgs {
                        shell: CompletionShell::Fish
                    })),
                    ..
                })
            ),
            "{cli:?}"
        );
        let bad = Cli::try_parse_from(["proxy", "completions", "tcsh"]).map(|_| ());
        assert_eq!(
            bad.map_err(|e| e.kind()),
            Err(clap::error::ErrorKind::InvalidValue)
        );
        let cli = Cli::try_parse_from(["proxy", "manpage"]).map_err(|e| e.to_string());
        assert!(
            matches!(
                cli,
                Ok(Cli {
                    command: Some(Subcommands::Manpage),
                    ..
                })
            ),
            "{cli:?}"
        );
        for shell in [
            CompletionShell::Bash,
            CompletionShell::Zsh,
            CompletionShell::Fish,
        ] {
            let script = String::from_utf8(completion_script(shell)).unwrap_or_default();
            assert!(script.contains("backend-port"), "{shell:?}: {script}");
            assert!(script.contains("selftest"), "{shell:?}");
        }
        let page = manpage().map(|p| String::from_utf8_lossy(&p).into_owned());
        let page = page.unwrap_or_default();
        assert!(page.lines().any(|l| l.starts_with(".TH ")), "{page}");
        assert!(page.contains("pid\\-file"), "{page}");
    }

    #[test]
    fn pid_file_is_a_long_flag() {
        let cli = Cli::try_parse_from(["proxy", "--pid-file", "/run/epoxy.pid"]);
        let path = cli.ok().and_then(|c| c.pid_file);
        assert_eq!(path, Some(PathBuf::from("/run/epoxy.pid")));
    }

    #[test]
    fn cpu_lists_parse() {
        assert_eq!(
            parse_cpu_list("0,2,4-6").map(|c| c.0),
            Ok(vec![0, 2, 4, 5, 6])
        );
        assert!(parse_cpu_list("a").is_err());
        assert!(parse_cpu_list("3-1").is_err());
    }

    #[test]
    fn defaults_describe_one_app() {
        let cli = Cli::try_parse_from(["proxy"]).map_err(|e| e.to_string());
        let cfg = cli.and_then(|c| c.to_config().map_err(|e| e.to_string()));
        let cfg = match cfg {
            Ok(c) => c,
            Err(e) => panic!("{e}"),
        };
        assert_eq!(cfg.apps.len(), 1);
        assert_eq!(cfg.apps[0].listen[0].to_string(), "0.0.0.0:8080");
        assert_eq!(cfg.apps[0].targets[0].addr.to_string(), "127.0.0.1:8081");
    }

    #[test]
    fn ipv6_backend_literal() {
        let cli = Cli::try_parse_from(["proxy", "-l", "::1", "-p", "0", "-b", "::1", "-P", "9"]);
        let cfg = cli.ok().and_then(|c| c.to_config().ok());
        let addr = cfg.map(|c| c.apps[0].targets[0].addr.to_string());
        assert_eq!(addr.as_deref(), Some("[::1]:9"));
    }

    /// `to_config` for `args` (after "proxy").
    fn config(args: &[&str]) -> Result<Config, String> {
        let argv = std::iter::once("proxy").chain(args.iter().copied());
        let cli = Cli::try_parse_from(argv).map_err(|e| e.to_string())?;
        cli.to_config().map_err(|e| e.to_string())
    }

    #[test]
    fn cli_target_that_is_its_own_listener_is_a_loop() {
        for args in [
            [
                "-l",
                "127.0.0.1",
                "-p",
                "8080",
                "-b",
                "127.0.0.1",
                "-P",
                "8080",
            ],
            [
                "-l",
                "0.0.0.0",
                "-p",
                "8080",
                "-b",
                "127.0.0.1",
                "-P",
                "8080",
            ],
            ["-l", "[::1]", "-p", "8080", "-b", "::1", "-P", "8080"],
        ] {
            let e = config(&args).expect_err("a loop");
            assert!(e.contains("loop"), "{args:?}: {e}");
            assert!(e.contains("key 'backend'"), "{args:?}: {e}");
            assert!(e.contains("command line"), "{args:?}: {e}");
            assert!(!e.contains('\n'), "{e}");
        }
        // The defaults listen on 0.0.0.0:8080, so -P 8080 alone loops too.
        assert!(config(&["-P", "8080"]).is_err_and(|e| e.contains("loop")));
        // Another port is fine.
        assert!(
            config(&[
                "-l",
                "127.0.0.1",
                "-p",
                "8080",
                "-b",
                "127.0.0.1",
                "-P",
                "8081"
            ])
            .is_ok()
        );
    }

    #[test]
    fn cli_and_file_resolve_a_name_alike() {
        let cli = config(&["-p", "0", "-b", "localhost", "-P", "8081"]).expect("cli");
        let file = config::load_str(
            "[[app]]\nname = \"a\"\nports = [0]\ntargets = [\"localhost:8081\"]\n",
            "a.toml",
            &Overrides::default(),
        )
        .expect("file");
        assert_eq!(cli.apps[0].targets[0].addr, file.apps[0].targets[0].addr);
        assert_eq!(cli.apps[0].targets[0].name, "localhost:8081");
        assert_eq!(file.apps[0].targets[0].name, "localhost:8081");
        // -l takes a name too, resolved the same way (IPv4 preferred).
        let l = config(&["-l", "localhost", "-p", "0"]).expect("-l localhost");
        assert_eq!(l.apps[0].listen[0].ip(), file.apps[0].targets[0].addr.ip());
    }

    #[test]
    fn cli_target_names_are_the_address_text() {
        let name = |args: &[&str]| config(args).map(|c| c.apps[0].targets[0].name.clone());
        assert_eq!(name(&[]).as_deref(), Ok("127.0.0.1:8081"));
        assert_eq!(name(&["-b", "::1", "-P", "9"]).as_deref(), Ok("[::1]:9"));
        assert_eq!(name(&["-b", "[::1]", "-P", "9"]).as_deref(), Ok("[::1]:9"));
        assert_eq!(name(&["-b", "0:0::1", "-P", "9"]).as_deref(), Ok("[::1]:9"));
        let listen = |args: &[&str]| config(args).map(|c| c.apps[0].listen[0].to_string());
        assert_eq!(
            listen(&["-l", "[::1]", "-p", "0"]).as_deref(),
            Ok("[::1]:0")
        );
        assert_eq!(listen(&["-l", "::", "-p", "7"]).as_deref(), Ok("[::]:7"));
    }

    #[test]
    fn cli_value_errors_say_command_line() {
        let e = config(&["-b", "no-such-host.invalid"]).expect_err("unresolvable");
        assert!(e.starts_with("key 'backend': cannot resolve"), "{e}");
        assert!(e.ends_with("(from the command line)"), "{e}");
        let e = config(&["-l", "no-such-host.invalid"]).expect_err("unresolvable");
        assert!(e.starts_with("key 'listen': "), "{e}");
        assert!(e.ends_with("(from the command line)"), "{e}");
        let e = config(&["-b", "bad host"]).expect_err("bad name");
        assert!(
            e.starts_with("key 'backend': target 'bad host:8081' may only"),
            "{e}"
        );
        let e = config(&["-p", "9000", "--admin", "127.0.0.1:9000"]).expect_err("overlap");
        assert!(e.starts_with("key 'admin': "), "{e}");
        assert!(e.ends_with("(from the command line)"), "{e}");
    }

    #[test]
    fn workers_limit_is_the_same_on_the_cli_and_in_a_file() {
        let max = MAX_WORKERS.to_string();
        let over = (MAX_WORKERS + 1).to_string();
        assert_eq!(parse_workers(&max), Ok(Workers::Count(MAX_WORKERS)));
        assert!(parse_workers(&over).is_err());
        assert!(parse_workers("0").is_err());
        let file = |n: &str| {
            config::load_str(
                &format!(
                    "[defaults]\nworkers = {n}\n[[app]]\nname = \"a\"\nports = [0]\ntargets = [\"127.0.0.1:1\"]\n"
                ),
                "w.toml",
                &Overrides::default(),
            )
        };
        assert_eq!(
            file(&max).map(|c| c.workers),
            Ok(Workers::Count(MAX_WORKERS))
        );
        assert!(file(&over).is_err_and(|e| e.to_string().contains("key 'defaults.workers'")));
        // Overrides from an embedder get the same check.
        let ov = Overrides {
            workers: Some(Workers::Count(MAX_WORKERS + 1)),
            ..Overrides::default()
        };
        let e = config::load_args(&AppArgs::default(), &ov).expect_err("too many");
        assert!(e.to_string().contains("key 'workers'"), "{e}");
    }
}
