//! Operator tooling end to end (issue 10): `proxy completions bash|zsh|fish` prints a script
//! that names the flags and subcommands (bash's passes `bash -n`), an unknown shell is a usage
//! error (exit 2), `proxy manpage` prints roff, and `--pid-file` holds the running proxy's PID
//! and is removed when it exits after SIGTERM — unless another process rewrote it meanwhile.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use crate::util::*;

/// Run the binary with `args` (logging off): its output.
fn proxy(args: &[&str]) -> Output {
    Command::new(PROXY_BIN)
        .args(args)
        .env("RUST_LOG", "off")
        .stdin(Stdio::null())
        .output()
        .expect("run proxy")
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn completions_for_each_shell_name_the_flags_and_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = proxy(&["completions", shell]);
        let script = stdout(&out);
        assert_eq!(out.status.code(), Some(0), "{shell}: {}", stderr(&out));
        for word in [
            "backend-port",
            "listen",
            "config",
            "check",
            "pid-file",
            "selftest",
            "completions",
            "manpage",
        ] {
            assert!(script.contains(word), "{shell} script lacks {word:?}");
        }
    }
}

#[test]
fn bash_completion_script_is_valid_bash() {
    let out = proxy(&["completions", "bash"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let mut bash = Command::new("bash")
        .arg("-n")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run bash -n (bash is needed for this test)");
    bash.stdin
        .take()
        .expect("piped stdin")
        .write_all(&out.stdout)
        .expect("feed bash -n");
    let checked = bash.wait_with_output().expect("bash -n");
    assert!(
        checked.status.success(),
        "bash -n refused the script: {}",
        stderr(&checked)
    );
}

#[test]
fn completions_for_an_unknown_shell_are_a_usage_error() {
    for args in [
        &["completions", "tcsh"][..],
        &["completions"][..],
        &["completions", "bash", "zsh"][..],
    ] {
        let out = proxy(args);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        assert!(stdout(&out).is_empty(), "{args:?}: {}", stdout(&out));
        assert!(!stderr(&out).contains("panicked"), "{}", stderr(&out));
    }
    let err = stderr(&proxy(&["completions", "tcsh"]));
    assert!(err.contains("tcsh") && err.contains("bash"), "{err}");
}

#[test]
fn manpage_is_roff_and_documents_the_flags() {
    let out = proxy(&["manpage"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let page = stdout(&out);
    // clap_mangen opens with two string definitions, then the title header.
    let header = page.lines().take(5).find(|l| l.starts_with(".TH "));
    assert!(
        header.is_some_and(|h| h.starts_with(".TH proxy 1")),
        "no .TH header at the top:\n{page}"
    );
    assert!(page.contains(".SH OPTIONS"), "{page}");
    // roff escapes '-' as '\-'.
    for flag in ["\\-\\-listen", "\\-\\-backend\\-port", "\\-\\-pid\\-file"] {
        assert!(page.contains(flag), "man page lacks {flag}");
    }
    assert!(page.contains("selftest") && page.contains("completions"));
}

/// A fresh directory for a pid file.
fn pid_dir(tag: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "epoxy-pidfile-{tag}-{}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos())
    ));
    std::fs::create_dir_all(&dir).expect("create pid file dir");
    dir
}

fn read_pid(path: &Path) -> Option<u32> {
    std::fs::read_to_string(path)
        .ok()?
        .strip_suffix('\n')?
        .parse()
        .ok()
}

#[test]
fn pid_file_holds_the_pid_while_running_and_is_removed_at_exit() {
    let backend = echo_server();
    let dir = pid_dir("run");
    let path = dir.join("proxy.pid");
    let path_arg = path.to_string_lossy().into_owned();
    let p = spawn_proxy_to(backend.addr(), &["--pid-file", &path_arg]);
    // Written before the proxy serves, and spawn_proxy_to waited for its listener.
    assert_eq!(read_pid(&path), Some(p.pid()), "{}", p.stderr_text());
    let mut s = connect(p.addr());
    assert_echo(&mut s, b"still serving with a pid file");
    drop(s);
    // Nothing but the pid file: the temporary file it was written through is gone.
    let names: Vec<_> = std::fs::read_dir(&dir)
        .expect("read pid dir")
        .filter_map(|e| e.ok().map(|e| e.file_name()))
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
    exit_cleanly(p);
    assert!(!path.exists(), "pid file left behind after a clean exit");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn pid_file_rewritten_by_another_process_is_kept_at_exit() {
    let backend = echo_server();
    let dir = pid_dir("taken");
    let path = dir.join("proxy.pid");
    let path_arg = path.to_string_lossy().into_owned();
    let p = spawn_proxy_to(backend.addr(), &["--pid-file", &path_arg]);
    assert_eq!(read_pid(&path), Some(p.pid()), "{}", p.stderr_text());
    // As a new process would after a SIGUSR2 upgrade.
    let other = p.pid().wrapping_add(1);
    std::fs::write(&path, format!("{other}\n")).expect("rewrite pid file");
    exit_cleanly(p);
    assert_eq!(read_pid(&path), Some(other));
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn unwritable_pid_file_is_a_runtime_failure() {
    let backend = echo_server();
    let dir = pid_dir("missing");
    let path = dir.join("no-such-dir").join("proxy.pid");
    let path_arg = path.to_string_lossy().into_owned();
    let args = proxy_args(backend.addr(), &["--pid-file", &path_arg]);
    let (status, err) = run_proxy_to_exit(&args, scaled_secs(15));
    assert_eq!(status.and_then(|s| s.code()), Some(1), "{err}");
    assert!(
        err.contains(&format!("proxy: pid file {path_arg}: write ")),
        "{err}"
    );
    assert!(
        !err.contains("listening on"),
        "served without its pid file: {err}"
    );
    assert_no_panic(&err);
    let _ = std::fs::remove_dir_all(&dir);
}
