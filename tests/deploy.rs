//! The deployment files (`Dockerfile`, `deploy/`, the README's build command) checked with
//! the tools that know their formats and against each other and the proxy:
//! - systemd: `systemd-analyze verify` on the units (the service's ExecStart pointed at the
//!   binary under test: verify refuses a unit whose binary does not exist), the offline
//!   `systemd-analyze security` exposure score, TimeoutStopSec against the sample config's
//!   drain_delay + grace_period, the socket unit's addresses against its listeners.
//! - Kubernetes: `kubernetes-validate --strict` on every manifest but the ServiceMonitor (a
//!   CRD it has no schema for; checked field by field here), then the manifests parsed
//!   (PyYAML, which kubernetes-validate depends on, turns them into JSON) and checked against
//!   the ConfigMap's proxy.toml as the proxy itself loads it: ports, probe paths (requested
//!   from a proxy started with that config), terminationGracePeriodSeconds, the memory limit.
//! - Docker: the Dockerfile's `# build:` command is the README's, and its user, ports, entry
//!   point and config path agree with the rest.
//!
//! A missing tool fails the test with the command that installs it (`.ci/run` installs them
//! all); nothing is skipped silently.

use std::collections::BTreeSet;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use epoxy::config::{self, Config, Overrides};
use serde_json::Value;

use crate::util::{
    any_port, http_get, scaled_secs, send_signal, start_cfg, startup_timeout, wait_until,
};

/// kubernetes-validate as `.ci/run` installs it (its schemas ship inside the package, so it
/// works offline).
const KV_INSTALL: &str = "python3 -m pip install kubernetes-validate==1.37.0";
/// The Kubernetes versions the manifests must validate against: the oldest supported here and
/// the newest schema kubernetes-validate 1.37.0 ships.
const KUBE_VERSIONS: [&str; 2] = ["1.29.0", "1.37.0"];
/// Highest acceptable `systemd-analyze security` exposure. The unit scores 1.7 with systemd
/// 252 (what it leaves open is listed in the unit: network, AF_UNIX, NotifyAccess=all, the
/// ambient CAP_NET_BIND_SERVICE); the margin is for other systemd versions' weights.
const MAX_EXPOSURE: f64 = 2.0;
/// Where the proxy's binary is installed by the Dockerfile and the systemd unit.
const INSTALLED_BIN: &str = "/usr/local/bin/proxy";
/// Where both read the configuration.
const CONFIG_PATH: &str = "/etc/epoxy/proxy.toml";

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    let p = root().join(rel);
    std::fs::read_to_string(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()))
}

/// Runs a tool; a missing one fails with the command that installs it.
fn run_tool(cmd: &mut Command, install: &str) -> Output {
    let name = cmd.get_program().to_string_lossy().into_owned();
    match cmd.output() {
        Ok(out) => out,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            panic!("`{name}` is not installed: run `{install}` (.ci/run does)")
        }
        Err(e) => panic!("run {name}: {e}"),
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// A fresh directory under the system temp dir, removed on drop.
struct Scratch(PathBuf);

impl Scratch {
    fn new(tag: &str) -> Scratch {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos());
        let dir =
            std::env::temp_dir().join(format!("epoxy-deploy-{tag}-{}-{nanos}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

// ---------------------------------------------------------------------------------------------
// The sample config and the proxy's own reading of config files
// ---------------------------------------------------------------------------------------------

/// `proxy --check -c FILE`: (success, stdout, stderr).
fn proxy_check(path: &Path) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_proxy"))
        .arg("--check")
        .arg("-c")
        .arg(path)
        .env("RUST_LOG", "off")
        .output()
        .expect("run proxy --check");
    (out.status.success(), text(&out.stdout), text(&out.stderr))
}

/// Asserts that `proxy --check` accepts `contents` (written as `name` in a scratch dir).
fn assert_check_ok(name: &str, contents: &str, what: &str) {
    let dir = Scratch::new("check");
    let path = dir.0.join(name);
    std::fs::write(&path, contents).expect("write config");
    let (ok, out, err) = proxy_check(&path);
    assert!(
        ok && out.lines().last() == Some("ok"),
        "proxy --check rejects {what}:\nstdout: {out}\nstderr: {err}\n{contents}"
    );
}

/// The config as the proxy resolves it (defaults applied, durations parsed).
fn load(contents: &str, what: &str) -> Config {
    config::load_str(contents, "proxy.toml", &Overrides::default())
        .unwrap_or_else(|e| panic!("{what} does not load: {e}"))
}

/// Every target spec ("host:port") of a TOML config: apps' and routes' targets, plain or
/// `{ addr = ... }`.
fn target_specs(contents: &str) -> Vec<String> {
    let doc: toml::Table = toml::from_str(contents).expect("TOML");
    let mut out = Vec::new();
    let mut push = |targets: Option<&toml::Value>| {
        for t in targets.and_then(|t| t.as_array()).into_iter().flatten() {
            let spec = t
                .as_str()
                .or_else(|| t.get("addr").and_then(|a| a.as_str()));
            out.extend(spec.map(str::to_string));
        }
    };
    for app in doc
        .get("app")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
    {
        push(app.get("targets"));
        for r in app
            .get("routes")
            .and_then(|r| r.as_array())
            .into_iter()
            .flatten()
        {
            push(r.get("targets"));
        }
    }
    out
}

/// Every `listen` address string of the apps of a TOML config (`ports` are not used by the
/// deployment configs: asserted).
fn listen_specs(contents: &str) -> Vec<String> {
    let doc: toml::Table = toml::from_str(contents).expect("TOML");
    let mut out = Vec::new();
    for app in doc
        .get("app")
        .and_then(|a| a.as_array())
        .into_iter()
        .flatten()
    {
        assert!(
            app.get("ports").is_none(),
            "the deployment configs use `listen`, not `ports`"
        );
        for l in app
            .get("listen")
            .and_then(|l| l.as_array())
            .into_iter()
            .flatten()
        {
            out.push(l.as_str().expect("listen entry is a string").to_string());
        }
    }
    out
}

/// What cluster host names become outside a cluster: an IP literal from TEST-NET-1 (RFC 5737,
/// never routed), so nothing is resolved, and not loopback, which the proxy refuses as a
/// target equal to its own `0.0.0.0` listener.
const STAND_IN: &str = "192.0.2.10";

/// The host part of "host:port" when it is a name rather than an IP literal.
fn host_name(spec: &str) -> Option<&str> {
    if spec.parse::<SocketAddr>().is_ok() {
        return None;
    }
    spec.rsplit_once(':').map(|(h, _)| h)
}

/// The ConfigMap's proxy.toml with every target host name replaced by `STAND_IN` (same port).
/// Cluster DNS names (`backend.default.svc.cluster.local`) resolve only inside a cluster,
/// and the proxy resolves target names when it loads a file; everything else is kept as
/// written. `proxy --check` on the text as written must fail only on those names.
fn cluster_config_here(contents: &str) -> String {
    let dir = Scratch::new("cm");
    let path = dir.0.join("proxy.toml");
    std::fs::write(&path, contents).expect("write config");
    let (ok, out, err) = proxy_check(&path);
    let names: Vec<String> = target_specs(contents)
        .iter()
        .filter_map(|s| host_name(s).map(str::to_string))
        .collect();
    if !ok {
        assert!(
            names
                .iter()
                .any(|n| err.contains(&format!("cannot resolve host '{n}'"))),
            "proxy --check rejects the ConfigMap's proxy.toml for another reason than an \
             unresolvable cluster name ({names:?}):\nstdout: {out}\nstderr: {err}"
        );
    }
    let mut here = contents.to_string();
    for spec in target_specs(contents) {
        if let Some(host) = host_name(&spec) {
            let port = &spec[host.len() + 1..];
            here = here.replace(&format!("\"{spec}\""), &format!("\"{STAND_IN}:{port}\""));
        }
    }
    here
}

#[test]
fn sample_config_passes_check() {
    let text = read("deploy/proxy.toml");
    assert_check_ok("proxy.toml", &text, "deploy/proxy.toml");
}

// ---------------------------------------------------------------------------------------------
// systemd
// ---------------------------------------------------------------------------------------------

const SYSTEMD_INSTALL: &str = "apt-get install -y systemd";

/// The `key=value` settings of a unit file, in order (comments and section headers dropped).
fn unit_settings(text: &str) -> Vec<(String, String)> {
    text.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#') && !l.starts_with(';'))
        .filter(|l| !l.starts_with('['))
        .filter_map(|l| l.split_once('='))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect()
}

/// The one value of `key` (panics when absent or repeated).
fn unit_value(settings: &[(String, String)], key: &str) -> String {
    let v: Vec<&String> = settings
        .iter()
        .filter(|(k, _)| k == key)
        .map(|(_, v)| v)
        .collect();
    assert_eq!(v.len(), 1, "the unit must set {key}= exactly once");
    v[0].clone()
}

/// A systemd time span in seconds, as systemd reads it (`systemd-analyze timespan`).
fn timespan_secs(span: &str) -> f64 {
    let out = run_tool(
        Command::new("systemd-analyze").args(["timespan", span]),
        SYSTEMD_INSTALL,
    );
    assert!(
        out.status.success(),
        "systemd-analyze timespan {span}: {}",
        text(&out.stderr)
    );
    let stdout = text(&out.stdout);
    let us: f64 = stdout
        .lines()
        .find_map(|l| l.trim().strip_prefix("μs:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no μs line in: {stdout}"));
    us / 1e6
}

#[test]
fn systemd_units_verify_with_the_built_binary() {
    let unit = read("deploy/systemd/epoxy.service");
    let exec = format!("ExecStart={INSTALLED_BIN} ");
    let lines: Vec<&str> = unit.lines().filter(|l| l.starts_with(&exec)).collect();
    assert_eq!(lines.len(), 1, "one ExecStart={INSTALLED_BIN} line");
    // `verify` checks that ExecStart's binary exists: point it at the binary under test.
    let copy = unit.replace(
        &exec,
        &format!("ExecStart={} ", env!("CARGO_BIN_EXE_proxy")),
    );
    let dir = Scratch::new("systemd");
    let service = dir.0.join("epoxy.service");
    let socket = dir.0.join("epoxy.socket");
    std::fs::write(&service, copy).expect("write unit");
    std::fs::write(&socket, read("deploy/systemd/epoxy.socket")).expect("write unit");
    let out = run_tool(
        Command::new("systemd-analyze")
            .arg("verify")
            .arg(&socket)
            .arg(&service),
        SYSTEMD_INSTALL,
    );
    let stderr = text(&out.stderr);
    // verify exits 0 on unknown keys and unparsable values (it only warns): any line about
    // our units is a failure.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("epoxy") || l.contains(&*dir.0.to_string_lossy()))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify failed ({:?}):\n{stderr}{}",
        out.status,
        text(&out.stdout)
    );
}

#[test]
fn systemd_unit_exposure_is_low() {
    let path = root().join("deploy/systemd/epoxy.service");
    let out = run_tool(
        Command::new("systemd-analyze")
            .args(["security", "--offline=true", "--no-pager"])
            .arg(&path),
        SYSTEMD_INSTALL,
    );
    let stdout = text(&out.stdout);
    let key = "Overall exposure level for epoxy.service:";
    let score: f64 = stdout
        .lines()
        .find_map(|l| l.split_once(key).map(|(_, rest)| rest.to_string()))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in the output of systemd-analyze security ({:?}):\n{stdout}{}",
                out.status,
                text(&out.stderr)
            )
        });
    assert!(
        score <= MAX_EXPOSURE,
        "exposure {score} > {MAX_EXPOSURE}:\n{stdout}"
    );
}

#[test]
fn systemd_unit_settings_fit_the_proxy() {
    let s = unit_settings(&read("deploy/systemd/epoxy.service"));
    assert_eq!(unit_value(&s, "Type"), "notify");
    // The new process of an upgrade sends MAINPID= and READY=1 before it is the main one.
    assert_eq!(unit_value(&s, "NotifyAccess"), "all");
    assert_eq!(unit_value(&s, "ExecReload"), "/bin/kill -HUP $MAINPID");
    let exec = unit_value(&s, "ExecStart");
    assert!(
        exec.starts_with(&format!("{INSTALLED_BIN} -c {CONFIG_PATH} ")),
        "ExecStart runs {INSTALLED_BIN} on {CONFIG_PATH}: {exec}"
    );
    // SIGTERM is the drain; an ExecStop would only get in its way.
    assert!(!s.iter().any(|(k, _)| k == "ExecStop"), "no ExecStop");
    assert!(
        s.iter()
            .all(|(k, v)| k != "KillSignal" || v == "SIGTERM" || v == "TERM")
    );
    // mixed would SIGKILL an old process still draining after an upgrade.
    assert!(
        s.iter()
            .all(|(k, v)| k != "KillMode" || v == "control-group"),
        "KillMode must stay control-group"
    );
    let families = unit_value(&s, "RestrictAddressFamilies");
    for f in ["AF_INET", "AF_INET6", "AF_UNIX"] {
        assert!(
            families.split_whitespace().any(|x| x == f),
            "RestrictAddressFamilies lacks {f} (AF_UNIX: sd_notify and the upgrade channel)"
        );
    }
    assert_eq!(
        unit_value(&s, "CapabilityBoundingSet"),
        "CAP_NET_BIND_SERVICE"
    );
    assert_eq!(
        unit_value(&s, "AmbientCapabilities"),
        "CAP_NET_BIND_SERVICE"
    );

    // The stop timeout covers the sample config's drain.
    let cfg = load(&read("deploy/proxy.toml"), "deploy/proxy.toml");
    let stop = timespan_secs(&unit_value(&s, "TimeoutStopSec"));
    let drain = (cfg.drain_delay + cfg.grace).as_secs_f64();
    assert!(
        stop > drain,
        "TimeoutStopSec {stop}s must exceed drain_delay + grace_period = {drain}s"
    );
}

#[test]
fn systemd_socket_matches_the_sample_config() {
    let s = unit_settings(&read("deploy/systemd/epoxy.socket"));
    let socket: BTreeSet<SocketAddr> = s
        .iter()
        .filter(|(k, _)| k == "ListenStream")
        .map(|(_, v)| {
            v.parse()
                .unwrap_or_else(|_| panic!("ListenStream={v}: use ip:port"))
        })
        .collect();
    let cfg = load(&read("deploy/proxy.toml"), "deploy/proxy.toml");
    let mut want: BTreeSet<SocketAddr> = cfg
        .apps
        .iter()
        .flat_map(|a| a.listen.iter().copied())
        .collect();
    want.extend(cfg.admin);
    assert_eq!(
        socket, want,
        "epoxy.socket's ListenStream= must be deploy/proxy.toml's listeners and admin address"
    );
    assert_eq!(unit_value(&s, "Service"), "epoxy.service");
}

// ---------------------------------------------------------------------------------------------
// Kubernetes
// ---------------------------------------------------------------------------------------------

const KUBE_DIR: &str = "deploy/kubernetes";

/// API groups whose kinds are CRDs, which kubernetes-validate has no schema for.
fn is_crd(doc: &Value) -> bool {
    doc["apiVersion"]
        .as_str()
        .is_some_and(|v| v.starts_with("monitoring.coreos.com/"))
}

/// The manifests: (file name, its documents as JSON), sorted by name.
fn manifests() -> Vec<(String, Vec<Value>)> {
    let dir = root().join(KUBE_DIR);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .expect("read deploy/kubernetes")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no manifests in {}", dir.display());
    files
        .iter()
        .map(|p| {
            let name = p.file_name().expect("name").to_string_lossy().into_owned();
            (name, yaml_docs(p))
        })
        .collect()
}

/// Every document of a YAML file, through PyYAML's safe loader.
fn yaml_docs(path: &Path) -> Vec<Value> {
    const SCRIPT: &str = "import json, sys, yaml\n\
        with open(sys.argv[1]) as f:\n    docs = [d for d in yaml.safe_load_all(f) if d is not None]\n\
        json.dump(docs, sys.stdout)\n";
    let out = run_tool(
        Command::new("python3").arg("-c").arg(SCRIPT).arg(path),
        KV_INSTALL,
    );
    let stderr = text(&out.stderr);
    assert!(
        !stderr.contains("No module named 'yaml'"),
        "PyYAML is missing: run `{KV_INSTALL}` (it brings PyYAML; .ci/run does)"
    );
    assert!(out.status.success(), "parse {}: {stderr}", path.display());
    serde_json::from_slice(&out.stdout).expect("JSON from PyYAML")
}

/// The one document of `kind` named `name` (any file).
fn find<'a>(all: &'a [(String, Vec<Value>)], kind: &str, name: &str) -> &'a Value {
    let v: Vec<&Value> = all
        .iter()
        .flat_map(|(_, d)| d.iter())
        .filter(|d| d["kind"] == kind && d["metadata"]["name"] == name)
        .collect();
    assert_eq!(v.len(), 1, "one {kind} named {name}");
    v[0]
}

fn all_of<'a>(all: &'a [(String, Vec<Value>)], kind: &str) -> Vec<&'a Value> {
    all.iter()
        .flat_map(|(_, d)| d.iter())
        .filter(|d| d["kind"] == kind)
        .collect()
}

/// Whether every `matchLabels` entry (or plain selector entry) is among `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let sel = selector.get("matchLabels").unwrap_or(selector);
    let Some(sel) = sel.as_object() else {
        return false;
    };
    !sel.is_empty() && sel.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// A container port given by number or by name.
fn port_of(container: &Value, port: &Value) -> u16 {
    if let Some(n) = port.as_u64() {
        return u16::try_from(n).expect("port number");
    }
    let name = port.as_str().expect("port is a number or a name");
    container["ports"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == name)
        .and_then(|p| p["containerPort"].as_u64())
        .map(|n| u16::try_from(n).expect("port number"))
        .unwrap_or_else(|| panic!("no container port named {name}"))
}

/// A Kubernetes memory quantity in bytes (the binary and decimal suffixes).
fn quantity_bytes(q: &str) -> u64 {
    let units: [(&str, u64); 8] = [
        ("Ki", 1 << 10),
        ("Mi", 1 << 20),
        ("Gi", 1 << 30),
        ("Ti", 1 << 40),
        ("k", 1_000),
        ("M", 1_000_000),
        ("G", 1_000_000_000),
        ("T", 1_000_000_000_000),
    ];
    for (suffix, mult) in units {
        if let Some(n) = q.strip_suffix(suffix) {
            return n.parse::<u64>().expect("quantity") * mult;
        }
    }
    q.parse().expect("quantity in bytes")
}

/// Everything the cross-checks need, loaded once per test.
struct Kube {
    all: Vec<(String, Vec<Value>)>,
    /// The ConfigMap's proxy.toml as written.
    config_text: String,
    /// The same with cluster host names replaced (see `cluster_config_here`).
    config_here: String,
    config: Config,
}

fn kube() -> Kube {
    let all = manifests();
    let cm = find(&all, "ConfigMap", "epoxy-config");
    let config_text = cm["data"]["proxy.toml"]
        .as_str()
        .expect("the ConfigMap has data.proxy.toml")
        .to_string();
    let config_here = cluster_config_here(&config_text);
    let config = load(&config_here, "the ConfigMap's proxy.toml");
    Kube {
        all,
        config_text,
        config_here,
        config,
    }
}

/// The Deployment's pod template and its `proxy` container.
fn pod(k: &Kube) -> (&Value, &Value) {
    let dep = find(&k.all, "Deployment", "epoxy");
    let spec = &dep["spec"]["template"]["spec"];
    let c = spec["containers"]
        .as_array()
        .and_then(|cs| cs.iter().find(|c| c["name"] == "proxy"))
        .expect("a container named proxy");
    (spec, c)
}

#[test]
fn kubernetes_manifests_pass_strict_schema_validation() {
    let all = manifests();
    let mut files = Vec::new();
    let mut resources = 0;
    for (name, docs) in &all {
        let crds = docs.iter().filter(|d| is_crd(d)).count();
        // kubernetes-validate works per file: a file is either all CRDs or none.
        assert!(
            crds == 0 || crds == docs.len(),
            "{name}: keep CRD documents in files of their own"
        );
        if crds == 0 {
            files.push(root().join(KUBE_DIR).join(name));
            resources += docs.len();
        }
    }
    for version in KUBE_VERSIONS {
        let out = run_tool(
            Command::new("python3")
                .args(["-m", "kubernetes_validate", "--strict", "-k", version])
                .args(&files),
            KV_INSTALL,
        );
        let report = format!("{}{}", text(&out.stdout), text(&out.stderr));
        assert!(
            !report.contains("No module named kubernetes_validate"),
            "kubernetes-validate is missing: run `{KV_INSTALL}` (.ci/run does)"
        );
        let passed = report.matches(" passed for resource ").count();
        assert!(
            out.status.success() && passed == resources && !report.contains("WARN"),
            "kubernetes-validate --strict -k {version}: {passed} of {resources} resources \
             passed ({:?}):\n{report}",
            out.status
        );
    }
}

#[test]
fn servicemonitor_scrapes_the_admin_port() {
    let k = kube();
    let (_, c) = pod(&k);
    let labels = &find(&k.all, "Deployment", "epoxy")["spec"]["template"]["metadata"]["labels"];
    let admin = k
        .config
        .admin
        .expect("the ConfigMap's config has [admin]")
        .port();
    let monitors = all_of(&k.all, "ServiceMonitor");
    assert_eq!(monitors.len(), 1, "one ServiceMonitor");
    let sm = monitors[0];
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    assert!(sm["metadata"]["name"].is_string());
    let services: Vec<&Value> = all_of(&k.all, "Service")
        .into_iter()
        .filter(|s| selects(&sm["spec"]["selector"], &s["metadata"]["labels"]))
        .collect();
    assert_eq!(services.len(), 1, "the ServiceMonitor selects one Service");
    let svc = services[0];
    assert!(
        selects(&svc["spec"]["selector"], labels),
        "that Service selects the proxy's pods"
    );
    assert_ne!(
        svc["spec"]["type"], "LoadBalancer",
        "metrics are not published through the load balancer"
    );
    let endpoints = sm["spec"]["endpoints"].as_array().expect("endpoints");
    assert!(!endpoints.is_empty());
    for ep in endpoints {
        let port = svc["spec"]["ports"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|p| p["name"] == ep["port"])
            .unwrap_or_else(|| panic!("the Service has no port named {}", ep["port"]));
        assert_eq!(port_of(c, &port["targetPort"]), admin, "scraped port");
        assert_eq!(ep["path"], "/metrics");
        assert!(ep.get("scheme").is_none_or(|s| s == "http"));
    }
}

#[test]
fn kubernetes_manifests_agree_with_the_configmap() {
    let k = kube();
    assert_check_ok("proxy.toml", &k.config_here, "the ConfigMap's proxy.toml");
    let cfg = &k.config;
    let admin = cfg.admin.expect("the ConfigMap's config has [admin]");
    assert!(
        admin.ip().is_unspecified(),
        "probes reach the pod IP: the admin endpoint must listen on 0.0.0.0 (or [::])"
    );
    let listen_ports: BTreeSet<u16> = cfg
        .apps
        .iter()
        .flat_map(|a| a.listen.iter().map(|l| l.port()))
        .collect();
    let dep = find(&k.all, "Deployment", "epoxy");
    let labels = &dep["spec"]["template"]["metadata"]["labels"];
    assert!(selects(&dep["spec"]["selector"], labels));
    let (spec, c) = pod(&k);

    // Container ports: the listeners and the admin endpoint, nothing else.
    let ports: BTreeSet<u16> = c["ports"]
        .as_array()
        .expect("container ports")
        .iter()
        .map(|p| port_of(c, &p["containerPort"]))
        .collect();
    let mut want = listen_ports.clone();
    want.insert(admin.port());
    assert_eq!(ports, want, "containerPorts = listen ports + admin port");

    // Probes: the admin routes, on the admin port.
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &c[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe} path");
        assert_eq!(port_of(c, &get["port"]), admin.port(), "{probe} port");
    }

    // Drain: either the config's drain_delay or a preStop sleep, and the kubelet waits for
    // both it and grace_period.
    let pre_stop = c["lifecycle"].get("preStop").is_some();
    assert!(
        !pre_stop || cfg.drain_delay.is_zero(),
        "drain_delay and a preStop hook both delay the drain: keep one"
    );
    let tgps = spec["terminationGracePeriodSeconds"]
        .as_f64()
        .expect("terminationGracePeriodSeconds");
    let drain = (cfg.drain_delay + cfg.grace).as_secs_f64();
    assert!(
        tgps > drain,
        "terminationGracePeriodSeconds {tgps} must exceed drain_delay + grace_period = {drain}"
    );

    // The config file: the ConfigMap's key, mounted where the args point.
    let vol = spec["volumes"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|v| v["configMap"]["name"] == "epoxy-config")
        .expect("a volume from the ConfigMap");
    assert!(
        vol["configMap"].get("items").is_none(),
        "the whole ConfigMap"
    );
    let mount = c["volumeMounts"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|m| m["name"] == vol["name"])
        .expect("the ConfigMap volume is mounted");
    let file = format!(
        "{}/proxy.toml",
        mount["mountPath"].as_str().expect("mountPath")
    );
    assert_eq!(file, CONFIG_PATH);
    if let Some(args) = c.get("args") {
        assert_eq!(args, &serde_json::json!(["-c", CONFIG_PATH]));
    }

    // Security context (pod and container).
    let sc = &c["securityContext"];
    assert_eq!(sc["allowPrivilegeEscalation"], false);
    assert_eq!(sc["readOnlyRootFilesystem"], true);
    assert_eq!(sc["capabilities"]["drop"], serde_json::json!(["ALL"]));
    let non_root = |v: &Value| v["runAsNonRoot"] == true;
    assert!(non_root(sc) || non_root(&spec["securityContext"]));
    let seccomp = |v: &Value| v["seccompProfile"]["type"] == "RuntimeDefault";
    assert!(seccomp(sc) || seccomp(&spec["securityContext"]));
    let uid = sc
        .get("runAsUser")
        .or_else(|| spec["securityContext"].get("runAsUser"))
        .and_then(Value::as_u64)
        .expect("runAsUser");
    assert_eq!(
        Some(uid),
        dockerfile_uid(),
        "runAsUser = the Dockerfile's USER"
    );

    // Memory: max_conns fits as configured (the proxy would lower it otherwise).
    let limits = &c["resources"]["limits"];
    let requests = &c["resources"]["requests"];
    assert!(requests["cpu"].is_string() && requests["memory"].is_string());
    let mem = quantity_bytes(limits["memory"].as_str().expect("a memory limit"));
    let (effective, notes) = epoxy::control::effective_max_conns(cfg, 1 << 20, 0, Some(mem));
    if let Some(want) = cfg.max_conns {
        assert_eq!(
            effective, want,
            "max_conns does not fit the memory limit: {notes:?}"
        );
    }

    // The load balancer Service: to a listen port, client addresses kept.
    let svc = find(&k.all, "Service", "epoxy");
    assert_eq!(svc["spec"]["type"], "LoadBalancer");
    assert_eq!(svc["spec"]["externalTrafficPolicy"], "Local");
    assert!(selects(&svc["spec"]["selector"], labels));
    for p in svc["spec"]["ports"].as_array().expect("ports") {
        let target = port_of(c, &p["targetPort"]);
        assert!(
            listen_ports.contains(&target),
            "Service port {} goes to {target}, not a listen port {listen_ports:?}",
            p["port"]
        );
    }
    // PROXY protocol: the annotation (shown commented) and accept_proxy go together.
    const PP: &str = "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol";
    let pp_on = svc["metadata"]["annotations"].get(PP).is_some();
    let raw = read(&format!("{KUBE_DIR}/service.yaml"));
    assert!(
        pp_on || raw.contains(&format!("# {PP}: \"*\"")),
        "service.yaml shows the PROXY protocol annotation"
    );
    assert!(
        k.config_text.contains("accept_proxy"),
        "the ConfigMap says where accept_proxy goes"
    );
    for app in &cfg.apps {
        assert_eq!(
            app.accept_proxy,
            pp_on,
            "app '{}': accept_proxy must be {pp_on} with the annotation {}",
            app.name,
            if pp_on { "on" } else { "off" }
        );
    }

    // Disruption budget and autoscaler: on these pods, policy/v1 and autoscaling/v2.
    let pdbs = all_of(&k.all, "PodDisruptionBudget");
    assert_eq!(pdbs.len(), 1);
    assert_eq!(pdbs[0]["apiVersion"], "policy/v1");
    assert!(selects(&pdbs[0]["spec"]["selector"], labels));
    let hpas = all_of(&k.all, "HorizontalPodAutoscaler");
    assert_eq!(hpas.len(), 1);
    let hpa = hpas[0];
    assert_eq!(hpa["apiVersion"], "autoscaling/v2");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], "Deployment");
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], "epoxy");
    assert!(
        hpa["spec"]["metrics"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|m| m["resource"]["name"] == "cpu")
    );
    assert!(
        dep["spec"].get("replicas").is_none(),
        "with an HPA the Deployment leaves `replicas` to it"
    );
}

/// The Deployment's probes against a proxy started from the ConfigMap's config (listeners
/// moved to loopback port 0, admin on `--admin 127.0.0.1:0`): each probe path answers 200
/// while serving, /metrics has epoxy's metrics, and after SIGTERM readiness turns 503 while
/// the listener still accepts (drain_delay).
#[test]
fn probes_answer_from_the_configmap_config() {
    let k = kube();
    let (_, c) = pod(&k);
    let mut contents = k.config_here.clone();
    for (i, l) in listen_specs(&k.config_here).iter().enumerate() {
        let quoted = format!("\"{l}\"");
        assert_eq!(contents.matches(&quoted).count(), 1, "{l} appears once");
        let n = u8::try_from(i + 1).expect("few listeners");
        contents = contents.replace(&quoted, &format!("\"{}\"", any_port(n)));
    }
    let listeners = listen_specs(&k.config_here).len();
    let started = start_cfg("toml", listeners, &[], true, &contents);
    let admin = started.admin.expect("admin address");
    let probe_path = |probe: &str| {
        c[probe]["httpGet"]["path"]
            .as_str()
            .unwrap_or_else(|| panic!("{probe} path"))
            .to_string()
    };
    for probe in ["readinessProbe", "livenessProbe"] {
        let path = probe_path(probe);
        let (code, body) = http_get(admin, &path).expect("GET probe");
        assert_eq!(code, 200, "{probe} GET {path}: {body}");
    }
    let (code, body) = http_get(admin, "/metrics").expect("GET /metrics");
    assert_eq!(code, 200);
    assert!(body.contains("epoxy_build_info"), "{body}");

    assert!(
        !k.config.drain_delay.is_zero(),
        "the ConfigMap's config sets a drain_delay"
    );
    send_signal(started.proxy.pid(), libc::SIGTERM).expect("SIGTERM");
    let ready = probe_path("readinessProbe");
    assert!(
        wait_until(startup_timeout(), || {
            http_get(admin, &ready).is_ok_and(|(code, _)| code == 503)
        }),
        "readiness did not turn 503 after SIGTERM; stderr:\n{}",
        started.proxy.stderr_text()
    );
    let (code, _) = http_get(admin, &probe_path("livenessProbe")).expect("GET liveness");
    assert_eq!(code, 200, "liveness stays 200 while draining");
    // Still within drain_delay (15 s): the listener accepts.
    let addr = started.addr(0);
    assert!(
        TcpStream::connect_timeout(&addr, scaled_secs(5)).is_ok(),
        "the listener refused a connection during drain_delay"
    );
    // Dropping `started` kills the proxy: the rest of the drain is the core tests' business.
}

// ---------------------------------------------------------------------------------------------
// Docker
// ---------------------------------------------------------------------------------------------

/// The Dockerfile's instructions (continuation lines joined), as (INSTRUCTION, arguments),
/// from the final stage only when `last_stage`.
fn dockerfile(last_stage: bool) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = Vec::new();
    let mut cur = String::new();
    for line in read("Dockerfile").lines() {
        let t = line.trim();
        if t.starts_with('#') || (t.is_empty() && cur.is_empty()) {
            continue;
        }
        if let Some(part) = t.strip_suffix('\\') {
            cur.push_str(part);
            cur.push(' ');
            continue;
        }
        cur.push_str(t);
        let (ins, args) = cur.split_once(' ').unwrap_or((cur.as_str(), ""));
        if ins.eq_ignore_ascii_case("FROM") && last_stage {
            out.clear();
        }
        out.push((ins.to_ascii_uppercase(), args.trim().to_string()));
        cur.clear();
    }
    out
}

fn docker_one(ins: &[(String, String)], name: &str) -> String {
    let v: Vec<&String> = ins
        .iter()
        .filter(|(i, _)| i == name)
        .map(|(_, a)| a)
        .collect();
    assert_eq!(v.len(), 1, "the final stage has one {name}");
    v[0].clone()
}

/// The numeric UID of the final stage's USER (None: not numeric).
fn dockerfile_uid() -> Option<u64> {
    let user = docker_one(&dockerfile(true), "USER");
    user.split(':').next()?.parse().ok()
}

/// The `# build: ...` command of the Dockerfile.
fn docker_build_command() -> String {
    let file = read("Dockerfile");
    let v: Vec<&str> = file
        .lines()
        .filter_map(|l| l.strip_prefix("# build: "))
        .collect();
    assert_eq!(v.len(), 1, "one `# build: ` comment in the Dockerfile");
    v[0].trim().to_string()
}

#[test]
fn readme_and_docs_give_the_dockerfiles_build_command() {
    let cmd = docker_build_command();
    assert!(cmd.starts_with("docker build "), "{cmd}");
    for doc in ["README.md", "docs/deploy.md"] {
        assert!(
            read(doc).lines().any(|l| l.trim() == cmd),
            "{doc} has no line `{cmd}` (the Dockerfile's `# build:` command)"
        );
    }
}

#[test]
fn dockerfile_agrees_with_the_deployment_files() {
    let all = dockerfile(false);
    assert!(
        all.iter()
            .any(|(i, a)| i == "RUN" && a.contains("cargo build --release --locked")),
        "the builder runs cargo build --release --locked"
    );
    let fin = dockerfile(true);
    let uid = dockerfile_uid().expect("USER is numeric (runAsNonRoot can check it)");
    assert_ne!(uid, 0, "the image runs as a non-root user");
    assert_eq!(
        docker_one(&fin, "ENTRYPOINT"),
        format!("[\"{INSTALLED_BIN}\"]")
    );
    assert_eq!(
        docker_one(&fin, "CMD"),
        format!("[\"-c\", \"{CONFIG_PATH}\"]")
    );
    assert_eq!(docker_one(&fin, "STOPSIGNAL"), "SIGTERM");
    assert!(
        fin.iter()
            .any(|(i, a)| i == "COPY" && a == &format!("deploy/proxy.toml {CONFIG_PATH}")),
        "the sample config is copied to {CONFIG_PATH}"
    );
    let exposed: BTreeSet<u16> = docker_one(&fin, "EXPOSE")
        .split_whitespace()
        .map(|p| p.trim_end_matches("/tcp").parse().expect("EXPOSE port/tcp"))
        .collect();
    let cfg = load(&read("deploy/proxy.toml"), "deploy/proxy.toml");
    let mut want: BTreeSet<u16> = cfg
        .apps
        .iter()
        .flat_map(|a| a.listen.iter().map(|l| l.port()))
        .collect();
    want.extend(cfg.admin.map(|a| a.port()));
    assert_eq!(exposed, want, "EXPOSE = deploy/proxy.toml's ports");
    let ignore = read(".dockerignore");
    for p in ["target", ".git", "fuzz/work"] {
        assert!(
            ignore.lines().any(|l| l.trim() == p),
            ".dockerignore leaves out {p}"
        );
    }
}
