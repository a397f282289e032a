//! The stats page (issue 13) in a real headless Chromium, driven over the DevTools protocol
//! on a pipe (`--remote-debugging-pipe`: NUL-separated JSON on fds 3 and 4, no WebSocket):
//! two apps (one named with `<script>` in it, started through the embedding API, since the
//! config files refuse such names), one target down by active health checks, three live
//! connections. The rendered page (after its script ran) must show both apps, every target
//! address with UP/DOWN and the live count 3; after one connection closes it must show 2
//! within 5 s with no reload; the odd name must be text, not markup. A screenshot is written
//! to `$CARGO_TARGET_TMPDIR/stats.png` (and to `docs/stats.png` with
//! `EPOXY_UPDATE_SCREENSHOT=1`).
//!
//! Chromium is required: the test fails with a clear message when it is missing (`.ci/run`
//! installs Debian's `chromium`; `EPOXY_CHROMIUM` names another binary).

use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use epoxy::config::{ActiveHealth, AppConfig, Config, HealthConfig, TargetConfig};
use serde_json::{Value, json};

use crate::util::*;

const EVIL: &str = "evil<script>alert(1)</script>";

/// The chromium binary: `$EPOXY_CHROMIUM`, or the first of the usual names on `PATH`.
fn chromium() -> String {
    if let Ok(c) = std::env::var("EPOXY_CHROMIUM") {
        return c;
    }
    for name in [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ] {
        let found = Command::new("sh")
            .arg("-c")
            .arg(format!("command -v {name}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if found {
            return name.to_string();
        }
    }
    panic!(
        "the stats page test needs a headless Chromium, and none was found on PATH: \
         install the Debian package `chromium` (.ci/run does) or set EPOXY_CHROMIUM"
    );
}

/// A headless Chromium driven over `--remote-debugging-pipe`. Killed on drop.
struct Browser {
    child: Child,
    to: ChildStdin,
    from: Receiver<Value>,
    next_id: u64,
    _profile: TempDir,
}

/// A directory removed on drop.
struct TempDir(std::path::PathBuf);

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

impl Browser {
    fn start() -> Browser {
        let bin = chromium();
        let profile = std::env::temp_dir().join(format!(
            "epoxy-chromium-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.subsec_nanos())
        ));
        std::fs::create_dir_all(&profile).expect("create chromium profile dir");
        // fd 3 = commands to the browser (our stdin pipe), fd 4 = its answers (our stdout).
        let mut child = Command::new("bash")
            .arg("-c")
            .arg("exec \"$0\" \"$@\" 3<&0 4>&1 0</dev/null 1>/dev/null")
            .arg(&bin)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--no-first-run",
                "--no-default-browser-check",
                "--window-size=1280,1000",
                "--remote-debugging-pipe",
            ])
            .arg(format!("--user-data-dir={}", profile.display()))
            .arg("about:blank")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start {bin}: {e}"));
        let to = child.stdin.take().expect("chromium stdin");
        let out = child.stdout.take().expect("chromium stdout");
        let (tx, from) = mpsc::channel();
        std::thread::spawn(move || {
            let mut r = BufReader::new(out);
            let mut buf = Vec::new();
            while r.read_until(0, &mut buf).is_ok_and(|n| n > 0) {
                if buf.last() == Some(&0) {
                    buf.pop();
                }
                if let Ok(v) = serde_json::from_slice::<Value>(&buf)
                    && tx.send(v).is_err()
                {
                    return;
                }
                buf.clear();
            }
        });
        Browser {
            child,
            to,
            from,
            next_id: 1,
            _profile: TempDir(profile),
        }
    }

    /// One DevTools command (in `session` when given); its `result`.
    fn call(&mut self, session: Option<&str>, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let mut msg = json!({"id": id, "method": method, "params": params});
        if let Some(s) = session {
            msg["sessionId"] = json!(s);
        }
        let mut bytes = msg.to_string().into_bytes();
        bytes.push(0);
        self.to
            .write_all(&bytes)
            .and_then(|()| self.to.flush())
            .unwrap_or_else(|e| panic!("send {method} to chromium: {e}"));
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let v = self
                .from
                .recv_timeout(left)
                .unwrap_or_else(|e| panic!("no answer from chromium to {method}: {e}"));
            if v.get("id").and_then(Value::as_u64) == Some(id) {
                if let Some(err) = v.get("error") {
                    panic!("chromium: {method}: {err}");
                }
                return v.get("result").cloned().unwrap_or(Value::Null);
            }
        }
    }

    /// Evaluate `expr` (which returns a string) in the page.
    fn eval(&mut self, session: &str, expr: &str) -> String {
        let r = self.call(
            Some(session),
            "Runtime.evaluate",
            json!({"expression": expr, "returnByValue": true}),
        );
        r["result"]["value"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Standard base64 (the screenshot DevTools returns).
fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => Some(c - b'A'),
        b'a'..=b'z' => Some(c - b'a' + 26),
        b'0'..=b'9' => Some(c - b'0' + 52),
        b'+' => Some(62),
        b'/' => Some(63),
        _ => None,
    };
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut acc, mut bits) = (0u32, 0);
    for v in s.bytes().filter_map(val) {
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    out
}

/// What the page shows, read from its DOM.
const STATE: &str = r#"JSON.stringify({
  apps: Array.from(document.querySelectorAll("section.app")).map(function (s) {
    return {
      name: s.querySelector(".name").textContent,
      live: s.querySelector("b.live").textContent,
      targets: Array.from(s.querySelectorAll("tr[data-address]")).map(function (r) {
        return [r.querySelector(".address").textContent, r.querySelector(".status").textContent];
      })
    };
  }),
  scripts: document.scripts.length,
  html: document.documentElement.outerHTML,
  marker: String(window.__epoxyTestMarker || "")
})"#;

fn page_state(b: &mut Browser, session: &str) -> Value {
    serde_json::from_str(&b.eval(session, STATE)).unwrap_or(Value::Null)
}

fn app_state<'a>(state: &'a Value, name: &str) -> Option<&'a Value> {
    state["apps"]
        .as_array()?
        .iter()
        .find(|a| a["name"].as_str() == Some(name))
}

#[test]
fn stats_page_renders_in_chromium_and_follows_live_counts() {
    let echo = echo_server();
    let echo2 = echo_server();
    // A target that refuses: a port that was free a moment ago.
    let dead: SocketAddr = {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        l.local_addr().expect("addr")
    };
    let listen: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let mut web = AppConfig::new(
        "web",
        vec![listen],
        vec![TargetConfig::new(echo.addr()), TargetConfig::new(dead)],
    );
    web.health = HealthConfig {
        active: Some(ActiveHealth {
            interval: Duration::from_millis(100),
            timeout: Duration::from_millis(500),
            rise: 1,
            fall: 1,
        }),
        ..web.health
    };
    let evil = AppConfig::new(EVIL, vec![listen], vec![TargetConfig::new(echo2.addr())]);
    let config = Config {
        apps: vec![web, evil],
        admin: Some("127.0.0.1:0".parse().expect("addr")),
        log_interval: None,
        ..Config::default()
    };
    let proxy = epoxy::Proxy::start(config).expect("start proxy");
    let admin = proxy.admin_addr().expect("admin address");
    let web_addr = proxy.local_addrs()[0];
    let evil_addr = proxy.local_addrs()[1];
    let view = proxy.view().clone();
    assert!(
        wait_until(Duration::from_secs(10), || {
            let apps = view.apps();
            !apps[0].targets[1].health.is_up(epoxy::health::now_ms())
        }),
        "the dead target was never marked down"
    );
    // Some traffic for the charts, then three live connections to `web`.
    for i in 0..20 {
        let mut c = connect(if i % 2 == 0 { web_addr } else { evil_addr });
        assert_echo(
            &mut c,
            format!("warm-up {i}: {}\n", "x".repeat(i * 500)).as_bytes(),
        );
    }
    let mut live: Vec<TcpStream> = (0..3)
        .map(|i| {
            let mut c = connect(web_addr);
            assert_echo(&mut c, format!("live {i}\n").as_bytes());
            c
        })
        .collect();
    assert!(
        wait_until(Duration::from_secs(10), || view.apps()[0].active() == 3),
        "three live pairs"
    );

    let mut b = Browser::start();
    let target = b.call(
        None,
        "Target.createTarget",
        json!({"url": format!("http://{admin}/stats")}),
    );
    let target_id = target["targetId"].as_str().expect("targetId").to_string();
    let attached = b.call(
        None,
        "Target.attachToTarget",
        json!({"targetId": target_id, "flatten": true}),
    );
    let session = attached["sessionId"]
        .as_str()
        .expect("sessionId")
        .to_string();

    // The page as rendered by its script: both apps, every target with its state, live 3.
    let mut state = Value::Null;
    let shown = wait_until(Duration::from_secs(15), || {
        state = page_state(&mut b, &session);
        app_state(&state, "web").is_some_and(|a| a["live"] == "3")
            && app_state(&state, EVIL).is_some()
    });
    assert!(shown, "page never showed both apps with live 3: {state}");
    let web_state = app_state(&state, "web").expect("web");
    let targets = web_state["targets"].as_array().expect("targets");
    let status_of = |addr: SocketAddr| {
        targets
            .iter()
            .find(|t| t[0].as_str() == Some(addr.to_string().as_str()))
            .and_then(|t| t[1].as_str())
            .map(str::to_string)
    };
    assert_eq!(status_of(echo.addr()).as_deref(), Some("UP"), "{state}");
    assert_eq!(status_of(dead).as_deref(), Some("DOWN"), "{state}");
    let evil_state = app_state(&state, EVIL).expect("evil app");
    assert_eq!(
        evil_state["targets"][0][0].as_str(),
        Some(echo2.addr().to_string().as_str())
    );
    assert_eq!(evil_state["targets"][0][1].as_str(), Some("UP"));
    // The odd name is text: escaped in the serialized DOM, and no script element was added.
    let html = state["html"].as_str().unwrap_or_default();
    assert!(
        html.contains("evil&lt;script&gt;alert(1)&lt;/script&gt;"),
        "name not escaped in the DOM"
    );
    assert!(!html.contains("<script>alert(1)"), "name became markup");
    assert_eq!(
        state["scripts"], 2,
        "only the page's own two script elements"
    );

    // One connection closes: the page follows by itself (no reload: the marker stays).
    b.eval(&session, "window.__epoxyTestMarker = 'same page'; ''");
    drop(live.pop());
    let t0 = Instant::now();
    let followed = wait_until(Duration::from_secs(5), || {
        state = page_state(&mut b, &session);
        app_state(&state, "web").is_some_and(|a| a["live"] == "2")
    });
    assert!(
        followed,
        "page did not show 2 live within 5 s: {}",
        app_state(&state, "web").cloned().unwrap_or_default()
    );
    assert_eq!(state["marker"], "same page", "the page was reloaded");
    eprintln!("stats page followed the close in {:?}", t0.elapsed());

    // A screenshot to look at (and for the README with EPOXY_UPDATE_SCREENSHOT=1).
    let shot = b.call(
        Some(&session),
        "Page.captureScreenshot",
        json!({"format": "png", "captureBeyondViewport": false}),
    );
    let png = base64_decode(shot["data"].as_str().unwrap_or_default());
    assert!(png.starts_with(b"\x89PNG"), "not a PNG screenshot");
    let path = std::path::Path::new(env!("CARGO_TARGET_TMPDIR")).join("stats.png");
    std::fs::write(&path, &png).expect("write screenshot");
    eprintln!("screenshot: {}", path.display());
    if std::env::var_os("EPOXY_UPDATE_SCREENSHOT").is_some() {
        let docs = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/stats.png");
        std::fs::write(&docs, &png).expect("write docs/stats.png");
    }
    let _ = b.call(None, "Browser.close", json!({}));
    drop(live);
}
