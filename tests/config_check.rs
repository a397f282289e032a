//! `proxy --check -c FILE` end to end: every shipped example passes with "ok" and exit 0, and
//! the resolved configuration (file or flags) is printed before it, one setting per line; a
//! table of broken files in all three formats each fails with exit 2 and one message that
//! names the file, the line (where the format has lines) and the key — never a panic.
//! Uses only std: the files go to a fresh directory under the system temp dir.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Run `proxy --check -c path`: (exit code, stdout, stderr).
fn check(path: &Path) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .arg("--check")
        .arg("-c")
        .arg(path)
        .env("RUST_LOG", "off")
        .output()
        .expect("run proxy --check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A fresh directory for this test run's files.
fn scratch_dir() -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0);
    let dir = std::env::temp_dir().join(format!(
        "epoxy-config-check-{}-{nanos}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("create scratch dir");
    dir
}

/// One broken file: its name (the extension picks the format), its text, the key the error
/// must name (`None`: no key applies) and the line it must name (`None`: no line).
struct Bad {
    file: &'static str,
    text: &'static str,
    key: Option<&'static str>,
    line: Option<usize>,
}

const fn bad(
    file: &'static str,
    text: &'static str,
    key: Option<&'static str>,
    line: Option<usize>,
) -> Bad {
    Bad {
        file,
        text,
        key,
        line,
    }
}

const BAD: &[Bad] = &[
    // ---- TOML
    bad(
        "unknown-app-key.toml",
        "[[app]]\nname = \"web\"\nports = [19000]\ntargets = [\"127.0.0.1:19001\"]\nmax_con = 3\n",
        Some("max_con"),
        Some(5),
    ),
    bad(
        "unknown-defaults-key.toml",
        "[defaults]\nworkerz = 2\n\n[[app]]\nname = \"web\"\nports = [19000]\ntargets = [\"127.0.0.1:19001\"]\n",
        Some("workerz"),
        Some(2),
    ),
    bad(
        "unknown-health-key.toml",
        "[[app]]\nname = \"web\"\nports = [19000]\ntargets = [\"127.0.0.1:19001\"]\n[app.health]\nintervall = \"1s\"\n",
        Some("intervall"),
        Some(6),
    ),
    bad(
        "wrong-type.toml",
        "[[app]]\nname = \"web\"\nports = [\"19000\"]\ntargets = [\"127.0.0.1:19001\"]\n",
        Some("ports"),
        Some(3),
    ),
    bad(
        "syntax.toml",
        "[[app]]\nname = \"web\nports = [19000]\n",
        None,
        Some(2),
    ),
    bad(
        "empty-targets.toml",
        "[[app]]\nname = \"web\"\nports = [19000]\ntargets = []\n",
        Some("targets"),
        Some(4),
    ),
    bad(
        "duplicate-name.toml",
        "[[app]]\nname = \"web\"\nports = [19000]\ntargets = [\"127.0.0.1:19001\"]\n\n[[app]]\nname = \"web\"\nports = [19002]\ntargets = [\"127.0.0.1:19001\"]\n",
        Some("name"),
        Some(7),
    ),
    bad(
        "same-listen.toml",
        "[[app]]\nname = \"a\"\nlisten = [\"127.0.0.1:19000\"]\ntargets = [\"127.0.0.1:19001\"]\n\n[[app]]\nname = \"b\"\nlisten = [\"127.0.0.1:19000\"]\ntargets = [\"127.0.0.1:19002\"]\n",
        Some("listen"),
        Some(8),
    ),
    bad(
        "port-range.toml",
        "[[app]]\nname = \"web\"\nports = [70000]\ntargets = [\"127.0.0.1:19001\"]\n",
        Some("ports"),
        Some(3),
    ),
    bad(
        "bad-duration.toml",
        "[[app]]\nname = \"web\"\nports = [19000]\ntargets = [\"127.0.0.1:19001\"]\nconnect_timeout = \"5 parsecs\"\n",
        Some("connect_timeout"),
        Some(5),
    ),
    bad(
        "bad-cidr.toml",
        "[[app]]\nname = \"web\"\nports = [19000]\ntargets = [\"127.0.0.1:19001\"]\nallow = [\"10.0.0.0/8\",\n  \"10.0.0.0/33\"]\n",
        Some("allow"),
        Some(6),
    ),
    bad(
        "cidr-host-bits.toml",
        "[defaults]\ndeny = [\"10.1.2.3/8\"]\n[[app]]\nname = \"web\"\nports = [19000]\ntargets = [\"127.0.0.1:19001\"]\n",
        Some("defaults.deny"),
        Some(2),
    ),
    bad(
        "send-proxy-version.toml",
        "[[app]]\nname = \"web\"\nports = [19000]\ntargets = [\"127.0.0.1:19001\"]\nsend_proxy = \"v3\"\n",
        Some("send_proxy"),
        Some(5),
    ),
    bad(
        "bad-sni.toml",
        "[[app]]\nname = \"web\"\nports = [19000]\ntargets = [\"127.0.0.1:19001\"]\nroutes = [{ sni = [\"*\"], targets = [\"127.0.0.1:19002\"] }]\n",
        Some("routes.sni"),
        Some(5),
    ),
    bad(
        "route-loop.toml",
        "[[app]]\nname = \"web\"\nlisten = [\"127.0.0.1:19000\"]\ntargets = [\"127.0.0.1:19001\"]\nroutes = [{ sni = [\"a.test\"], targets = [\"127.0.0.1:19000\"] }]\n",
        Some("routes.targets"),
        Some(5),
    ),
    bad(
        "sni-required-alone.toml",
        "[[app]]\nname = \"web\"\nports = [19000]\ntargets = [\"127.0.0.1:19001\"]\nsni_required = true\n",
        Some("sni_required"),
        Some(5),
    ),
    bad(
        "unresolvable.toml",
        "[[app]]\nname = \"web\"\nports = [19000]\ntargets = [\n  \"127.0.0.1:19001\",\n  \"no-such-host.invalid:80\",\n]\n",
        Some("targets"),
        Some(6),
    ),
    bad(
        "bad-balance.toml",
        "[defaults]\nbalance = \"fastest\"\n[[app]]\nname = \"web\"\nports = [19000]\ntargets = [\"127.0.0.1:19001\"]\n",
        Some("balance"),
        Some(2),
    ),
    bad(
        "weight-zero.toml",
        "[[app]]\nname = \"web\"\nports = [19000]\ntargets = [{ addr = \"127.0.0.1:19001\", weight = 0 }]\n",
        Some("weight"),
        Some(4),
    ),
    bad(
        "rise-zero.toml",
        "[[app]]\nname = \"web\"\nports = [19000]\ntargets = [\"127.0.0.1:19001\"]\n[app.health]\ninterval = \"1s\"\nrise = 0\n",
        Some("rise"),
        Some(7),
    ),
    bad(
        "buffer-size.toml",
        "[defaults]\nbuffer_size = 100\n[[app]]\nname = \"web\"\nports = [19000]\ntargets = [\"127.0.0.1:19001\"]\n",
        Some("buffer_size"),
        Some(2),
    ),
    bad(
        "no-name.toml",
        "[[app]]\nports = [19000]\ntargets = [\"127.0.0.1:19001\"]\n",
        Some("name"),
        Some(1),
    ),
    bad(
        "no-apps.toml",
        "[defaults]\nworkers = 1\n",
        Some("app"),
        None,
    ),
    bad(
        "target-is-self.toml",
        "[[app]]\nname = \"web\"\nports = [19000]\ntargets = [\"127.0.0.1:19000\"]\n",
        Some("targets"),
        Some(4),
    ),
    bad(
        "bad-app-name.toml",
        "[[app]]\nname = \"a\\nb\"\nports = [19000]\ntargets = [\"127.0.0.1:19001\"]\n",
        Some("name"),
        Some(2),
    ),
    bad(
        "bad-target-name.toml",
        "[[app]]\nname = \"web\"\nports = [19000]\ntargets = [\n  \"127.0.0.1:19001\",\n  \"<b>:80\",\n]\n",
        Some("targets"),
        Some(6),
    ),
    // ---- JSON
    bad(
        "unknown-key.json",
        "{\"Apps\": [\n  {\"Name\": \"x\",\n   \"Ports\": [19000],\n   \"Target\": [\"127.0.0.1:19001\"]}\n]}\n",
        Some("Target"),
        Some(4),
    ),
    bad(
        "empty-targets.json",
        "{\"Apps\": [\n  {\"Name\": \"x\",\n   \"Ports\": [19000],\n   \"Targets\": []}\n]}\n",
        Some("Targets"),
        Some(4),
    ),
    bad(
        "port-range.json",
        "{\"Apps\": [\n  {\"Name\": \"x\",\n   \"Ports\": [19000, 65536],\n   \"Targets\": [\"127.0.0.1:19001\"]}\n]}\n",
        Some("Ports"),
        Some(3),
    ),
    bad(
        "duplicate-name.json",
        "{\"Apps\": [\n  {\"Name\": \"x\", \"Ports\": [19000], \"Targets\": [\"127.0.0.1:19001\"]},\n  {\"Name\": \"x\", \"Ports\": [19002], \"Targets\": [\"127.0.0.1:19001\"]}\n]}\n",
        Some("Name"),
        Some(3),
    ),
    bad(
        "wrong-type.json",
        "{\"Apps\": [\n  {\"Name\": \"x\",\n   \"Ports\": \"19000\",\n   \"Targets\": [\"127.0.0.1:19001\"]}\n]}\n",
        Some("Ports"),
        Some(3),
    ),
    bad(
        "unresolvable.json",
        "{\"Apps\": [\n  {\"Name\": \"x\",\n   \"Ports\": [19000],\n   \"Targets\": [\"no-such-host.invalid:80\"]}\n]}\n",
        Some("Targets"),
        Some(4),
    ),
    bad(
        "bad-app-name.json",
        "{\"Apps\": [\n  {\"Name\": \"five thousand\",\n   \"Ports\": [19000],\n   \"Targets\": [\"127.0.0.1:19001\"]}\n]}\n",
        Some("Name"),
        Some(2),
    ),
    bad(
        "bad-target-name.json",
        "{\"Apps\": [\n  {\"Name\": \"x\",\n   \"Ports\": [19000],\n   \"Targets\": [\"host\\nname:80\"]}\n]}\n",
        Some("Targets"),
        Some(4),
    ),
    // ---- pipe lines
    bad(
        "duplicate-port.conf",
        "# two lines, one port\n19000 | 127.0.0.1 | 19001\n19000 | 127.0.0.1 | 19002\n",
        Some("local_port"),
        Some(3),
    ),
    bad(
        "local-port-range.conf",
        "\n99999 | 127.0.0.1 | 19001\n",
        Some("local_port"),
        Some(2),
    ),
    bad(
        "remote-port.conf",
        "19000 | 127.0.0.1 | http   # not a number\n",
        Some("remote_port"),
        Some(1),
    ),
    bad(
        "unresolvable.conf",
        "19000 | 127.0.0.1 | 19001\n19002 | no-such-host.invalid | 80\n",
        Some("remote_host"),
        Some(2),
    ),
    bad(
        "bad-host-name.conf",
        "19000 | 127.0.0.1 | 19001\n19002 | <script> | 80\n",
        Some("remote_host"),
        Some(2),
    ),
    // ---- any other extension
    bad("proxy.yaml", "apps: []\n", None, None),
];

#[test]
fn check_accepts_every_example_config() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    let mut checked = 0;
    for entry in std::fs::read_dir(&dir).expect("read config/") {
        let path = entry.expect("config/ entry").path();
        if !path.is_file() {
            continue;
        }
        let (code, stdout, stderr) = check(&path);
        assert_eq!(
            code,
            Some(0),
            "{}: stdout {stdout:?} stderr {stderr:?}",
            path.display()
        );
        assert!(stdout.contains("ok"), "{}: {stdout:?}", path.display());
        checked += 1;
    }
    assert!(checked >= 3, "proxy.toml, apps.json and forwarder.conf");
}

#[test]
fn check_rejects_bad_configs_naming_file_line_and_key() {
    assert!(BAD.len() >= 15);
    let dir = scratch_dir();
    let mut failures = Vec::new();
    for case in BAD {
        let path = dir.join(case.file);
        std::fs::write(&path, case.text).expect("write bad config");
        let (code, stdout, stderr) = check(&path);
        let all = format!("{stdout}{stderr}");
        let shown = path.display().to_string();
        let mut why = Vec::new();
        if code != Some(2) {
            why.push(format!("exit {code:?}, want 2"));
        }
        if all.contains("panicked") {
            why.push("panicked".to_string());
        }
        // One line names it all: "FILE[:LINE]: [app 'A': ][key 'K': ]message".
        match all.lines().find(|l| l.contains(&shown)) {
            None => why.push("no line names the file".to_string()),
            Some(msg) => {
                if let Some(line) = case.line {
                    let want = format!("{shown}:{line}:");
                    if !msg.contains(&want) {
                        why.push(format!("want {want:?}"));
                    }
                }
                if let Some(key) = case.key {
                    // TOML keys may be shown with their table ("defaults.balance").
                    let plain = format!("key '{key}'");
                    let dotted = format!(".{key}'");
                    if !msg.contains(&plain) && !msg.contains(&dotted) {
                        why.push(format!("want key '{key}'"));
                    }
                }
            }
        }
        if !why.is_empty() {
            failures.push(format!(
                "{}: {} -- output: {all:?}",
                case.file,
                why.join(", ")
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn check_reports_a_missing_file() {
    let path = scratch_dir().join("absent.toml");
    let (code, stdout, stderr) = check(&path);
    assert_eq!(code, Some(2), "{stdout}{stderr}");
    assert!(format!("{stdout}{stderr}").contains(&path.display().to_string()));
    if let Some(dir) = path.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

/// Port 0 (any free port) is a valid listen entry in every format that has one; the tests
/// rely on it to never pick a port themselves.
#[test]
fn check_accepts_port_zero() {
    let dir = scratch_dir();
    let cases = [
        (
            "zero-listen.toml",
            "[[app]]\nname = \"a\"\nlisten = [\"127.0.0.1:0\", \"127.0.0.2:0\"]\ntargets = [\"127.0.0.1:19001\"]\n\n[[app]]\nname = \"b\"\nlisten = [\"127.0.0.1:0\"]\ntargets = [\"127.0.0.1:19001\"]\n",
        ),
        (
            "zero-ports.toml",
            "[[app]]\nname = \"a\"\nports = [0, 0]\ntargets = [\"127.0.0.1:19001\"]\n",
        ),
        (
            "zero-ports.json",
            "{\"Apps\": [{\"Name\": \"a\", \"Ports\": [0, 0], \"Targets\": [\"127.0.0.1:19001\"]}]}\n",
        ),
    ];
    let mut failures = Vec::new();
    for (file, text) in cases {
        let path = dir.join(file);
        std::fs::write(&path, text).expect("write config");
        let (code, stdout, stderr) = check(&path);
        if code != Some(0) || !stdout.contains("ok") {
            failures.push(format!(
                "{file}: exit {code:?}, output {stdout:?}{stderr:?}"
            ));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// Run `proxy --check` with `args` (no file): (exit code, stdout, stderr).
fn check_args(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .arg("--check")
        .args(args)
        .env("RUST_LOG", "off")
        .output()
        .expect("run proxy --check");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The lines of `stdout` that `want` lacks, as a message (empty when all are there).
fn missing_lines(stdout: &str, want: &[&str]) -> String {
    let lines: Vec<&str> = stdout.lines().collect();
    want.iter()
        .filter(|w| !lines.contains(w))
        .map(|w| format!("missing {w:?}\n"))
        .collect()
}

#[test]
fn check_prints_the_resolved_multi_app_config_then_ok() {
    let dir = scratch_dir();
    let path = dir.join("multi.toml");
    std::fs::write(
        &path,
        r#"
[defaults]
workers = 2
max_conns = 900
connect_timeout = "4s"
grace_period = "12s"
balance = "random"

[admin]
listen = "127.0.0.1:0"

[[app]]
name = "web"
listen = ["127.0.0.1:0", "127.0.0.2:0"]
targets = ["127.0.0.1:19001", { addr = "127.0.0.1:19002", weight = 5 }]
max_conns = 300
max_conns_per_source = 20
idle_timeout = "90s"
connect_timeout = "250ms"
[app.health]
interval = "3s"
fall = 2

[[app]]
name = "edge"
listen = ["127.0.0.3:0"]
targets = ["127.0.0.1:19003"]
accept_proxy = true
send_proxy = "v1"
deny = ["192.0.2.0/24"]
"#,
    )
    .expect("write config");
    let (code, stdout, stderr) = check(&path);
    assert_eq!(code, Some(0), "stdout {stdout:?} stderr {stderr:?}");
    assert_eq!(stdout.lines().last(), Some("ok"), "{stdout}");
    let missing = missing_lines(
        &stdout,
        &[
            &format!("source: {}", path.display()),
            "workers: 2",
            "max_conns: 900 (lowered at start if it does not fit the open-files or memory limit)",
            "grace_period: 12s",
            "admin: 127.0.0.1:0",
            "apps: 2",
            "app: web",
            "  listen: 127.0.0.1:0, 127.0.0.2:0",
            "  balance: random",
            "  target: 127.0.0.1:19001 weight 1",
            "  target: 127.0.0.1:19002 weight 5",
            "  max_conns: 300",
            "  max_conns_per_source: 20",
            "  connect_timeout: 250ms",
            "  idle_timeout: 90s",
            "  health.active: interval 3s, timeout 1s, rise 2, fall 2",
            "app: edge",
            "  listen: 127.0.0.3:0",
            "  target: 127.0.0.1:19003 weight 1",
            "  max_conns: off (the process limit only)",
            "  connect_timeout: 4s",
            "  idle_timeout: off",
            "  health.active: off",
            "  accept_proxy: on",
            "  send_proxy: v1",
            "  deny: 192.0.2.0/24",
        ],
    );
    assert!(missing.is_empty(), "{missing}in:\n{stdout}");
    // Apps in file order, after the globals.
    let at = |s: &str| stdout.lines().position(|l| l == s);
    assert!(at("apps: 2") < at("app: web") && at("app: web") < at("app: edge"));
    // The same file prints the same text.
    assert_eq!(check(&path).1, stdout);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn check_prints_the_config_the_flags_describe() {
    let (code, stdout, stderr) = check_args(&[
        "-l",
        "127.0.0.1",
        "-p",
        "0",
        "-P",
        "19001",
        "--idle-timeout",
        "2m",
        "--log-interval",
        "off",
        "--buffer-size",
        "16384",
    ]);
    assert_eq!(code, Some(0), "stdout {stdout:?} stderr {stderr:?}");
    assert_eq!(stdout.lines().last(), Some("ok"), "{stdout}");
    let missing = missing_lines(
        &stdout,
        &[
            "source: command line",
            "buffer_size: 16384 B",
            "log_interval: off",
            "apps: 1",
            "app: default",
            "  listen: 127.0.0.1:0",
            "  target: 127.0.0.1:19001 weight 1",
            "  idle_timeout: 2m",
        ],
    );
    assert!(missing.is_empty(), "{missing}in:\n{stdout}");
}

#[test]
fn check_of_every_example_ends_with_ok_after_its_apps() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("config");
    for entry in std::fs::read_dir(&dir).expect("read config/") {
        let path = entry.expect("config/ entry").path();
        if !path.is_file() {
            continue;
        }
        let (code, stdout, stderr) = check(&path);
        assert_eq!(code, Some(0), "{}: {stderr}", path.display());
        assert_eq!(stdout.lines().last(), Some("ok"), "{}", path.display());
        assert!(
            stdout.lines().any(|l| l.starts_with("app: ")),
            "{}: {stdout}",
            path.display()
        );
    }
}
