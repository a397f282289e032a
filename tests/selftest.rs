//! `proxy selftest` (issue 13) and container awareness end to end: the selftest passes on
//! this machine and fails its fd check when the open-files limit is set too low on purpose;
//! fake cgroup trees (v1 and v2, via `EPOXY_CGROUP_ROOT`) set `workers auto` and the default
//! `max_conns` of the real binary, and unlimited or unreadable files mean no limit.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::Value;

use crate::util::*;

/// Run `proxy selftest --json` through bash with `prefix` (e.g. `ulimit -n 256 &&`) and
/// `envs`; the status and the parsed report.
fn selftest(prefix: &str, envs: &[(&str, &str)]) -> (Output, Value) {
    let mut cmd = Command::new("bash");
    cmd.arg("-c")
        .arg(format!("{prefix} exec \"$0\" selftest --json"))
        .arg(PROXY_BIN);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run proxy selftest");
    let report: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "selftest --json printed no JSON ({e}); stdout:\n{}\nstderr:\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out, report)
}

fn check<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["checks"]
        .as_array()
        .and_then(|c| c.iter().find(|c| c["name"] == name))
        .unwrap_or_else(|| panic!("no check {name} in {report}"))
}

#[test]
fn selftest_passes_on_this_machine() {
    let _heavy = heavy_lock();
    let t0 = std::time::Instant::now();
    let (out, report) = selftest("", &[]);
    let took = t0.elapsed();
    for c in report["checks"].as_array().expect("checks") {
        assert!(
            c["result"] == "PASS" || (c["name"] == "ipv6" && c["result"] == "SKIP"),
            "{c}"
        );
    }
    assert_eq!(out.status.code(), Some(0), "{report}");
    assert_eq!(report["passed"], true);
    assert!(took < Duration::from_secs(20), "selftest took {took:?}");
    // The human form: one line per check.
    let text = Command::new(PROXY_BIN)
        .arg("selftest")
        .output()
        .expect("run proxy selftest");
    let table = String::from_utf8_lossy(&text.stdout);
    assert!(table.contains("half-close     PASS"), "{table}");
    assert!(table.contains("10 checks: "), "{table}");
    assert_eq!(text.status.code(), Some(0), "{table}");
}

#[test]
fn selftest_fails_when_the_fd_limit_is_too_low() {
    let _heavy = heavy_lock();
    let (out, report) = selftest("ulimit -n 256 &&", &[]);
    assert_eq!(out.status.code(), Some(1), "{report}");
    assert_eq!(report["passed"], false);
    let fd = check(&report, "fd-limit");
    assert_eq!(fd["result"], "FAIL", "{fd}");
    assert!(
        fd["detail"].as_str().is_some_and(|d| d.contains("256")),
        "{fd}"
    );
    // The other checks still ran and passed.
    assert_eq!(check(&report, "half-close")["result"], "PASS");
}

/// A fake cgroup tree, removed on drop.
struct FakeCgroup(PathBuf);

impl FakeCgroup {
    fn new(files: &[(&str, &str)]) -> FakeCgroup {
        let root = std::env::temp_dir().join(format!(
            "epoxy-fake-cgroup-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        ));
        for (rel, text) in files {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().expect("parent")).expect("mkdir");
            if text.is_empty() {
                // An unreadable file: a directory where the file should be.
                std::fs::create_dir_all(&p).expect("mkdir");
            } else {
                std::fs::write(&p, text).expect("write");
            }
        }
        FakeCgroup(root)
    }

    fn root(&self) -> String {
        self.0.to_string_lossy().into_owned()
    }
}

impl Drop for FakeCgroup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Start the real binary with `--workers auto` under `tree`; its stderr after start.
fn start_under(tree: &FakeCgroup) -> String {
    let echo = echo_server();
    let mut cmd = Command::new(PROXY_BIN);
    cmd.args(proxy_args(echo.addr(), &["--workers", "auto"]))
        .env("EPOXY_CGROUP_ROOT", tree.root());
    let p = spawn_proxy_cmd(cmd);
    assert!(
        p.wait_stderr_contains("started:", Duration::from_secs(5)),
        "{}",
        p.stderr_text()
    );
    exit_cleanly(p)
}

#[test]
fn cgroup_v2_quota_and_memory_set_workers_and_max_conns() {
    let tree = FakeCgroup::new(&[
        ("proc/self/cgroup", "0::/system.slice/epoxy.service\n"),
        ("sys/fs/cgroup/cgroup.controllers", "cpu memory\n"),
        (
            "sys/fs/cgroup/system.slice/epoxy.service/cpu.max",
            "100000 100000\n",
        ),
        (
            "sys/fs/cgroup/system.slice/epoxy.service/memory.max",
            "67108864\n",
        ),
        ("sys/fs/cgroup/system.slice/memory.max", "max\n"),
    ]);
    let text = start_under(&tree);
    assert!(text.contains("workers auto: 1 "), "{text}");
    assert!(text.contains("cgroup CPU quota Some(1.0)"), "{text}");
    // 64 MiB: half for buffers, 2 x 8 KiB per pair.
    assert!(
        text.contains("cgroup memory limit 64 MiB") && text.contains("using max_conns 2048"),
        "{text}"
    );
    assert!(text.contains("max_conns 2048,"), "{text}");
    let (_, report) = selftest("", &[("EPOXY_CGROUP_ROOT", &tree.root())]);
    let cpu = check(&report, "cgroup-cpu")["detail"]
        .as_str()
        .unwrap_or_default();
    assert!(
        cpu.contains("CPU quota 1 CPUs") && cpu.contains("workers auto = 1"),
        "{cpu}"
    );
    let mem = check(&report, "cgroup-memory")["detail"]
        .as_str()
        .unwrap_or_default();
    assert!(
        mem.contains("memory limit 64 MiB") && mem.contains("max_conns 2048"),
        "{mem}"
    );
}

#[test]
fn cgroup_v1_limits_and_unlimited_or_unreadable_files() {
    let v1 = FakeCgroup::new(&[
        (
            "proc/self/cgroup",
            "5:memory:/docker/c1\n3:cpu,cpuacct:/docker/c1\n",
        ),
        ("sys/fs/cgroup/memory/memory.limit_in_bytes", "134217728\n"),
        ("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "50000\n"),
        ("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n"),
    ]);
    let text = start_under(&v1);
    assert!(text.contains("workers auto: 1 "), "{text}");
    assert!(text.contains("cgroup CPU quota Some(0.5)"), "{text}");
    assert!(text.contains("using max_conns 4096"), "{text}");

    // Unlimited (v1's huge number, v2's "max") and unreadable files: no limit at all.
    let unlimited = FakeCgroup::new(&[
        ("proc/self/cgroup", "5:memory:/\n3:cpu,cpuacct:/\n"),
        (
            "sys/fs/cgroup/memory/memory.limit_in_bytes",
            "9223372036854771712\n",
        ),
        ("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_quota_us", "-1\n"),
        ("sys/fs/cgroup/cpu,cpuacct/cpu.cfs_period_us", "100000\n"),
    ]);
    let unreadable = FakeCgroup::new(&[
        ("proc/self/cgroup", "0::/x\n"),
        ("sys/fs/cgroup/cgroup.controllers", "cpu memory\n"),
        ("sys/fs/cgroup/x/memory.max", ""),
        ("sys/fs/cgroup/x/cpu.max", "garbage 100000\n"),
    ]);
    for tree in [&unlimited, &unreadable] {
        let text = start_under(tree);
        assert!(text.contains("cgroup CPU quota None"), "{text}");
        assert!(!text.contains("cgroup memory limit"), "{text}");
        let (_, report) = selftest("", &[("EPOXY_CGROUP_ROOT", &tree.root())]);
        let mem = check(&report, "cgroup-memory")["detail"]
            .as_str()
            .unwrap_or_default();
        assert!(mem.starts_with("no memory limit"), "{mem}");
    }
}
