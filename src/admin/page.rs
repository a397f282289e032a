//! The stats page (`GET /stats`): one self-contained HTML document (no external assets, works
//! offline) in the spirit of HAProxy's stats page, and the JSON it refreshes from
//! (`GET /stats?format=json`: the `/metrics?format=json` document plus each app's five-minute
//! `history`, the process figures and the admin's own counters).
//!
//! Names come from the config. They reach the page in two ways, both escaped: the first data
//! is embedded as JSON in a `<script type="application/json">` with `<`, `>` and `&` written
//! as `\u003c` etc. (so no name can close the element), and the script renders every value
//! with `textContent`/`createTextNode`, never as markup. The `<noscript>` part is rendered
//! here with [`html_escape`].

use std::fmt::Write as _;
use std::sync::atomic::Ordering::Relaxed;

use serde_json::{Value, json};

use super::render;
use super::server::Shared;

/// Escape text for HTML element content and quoted attribute values.
pub fn html_escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// JSON text that is safe inside a `<script>` element: `<`, `>` and `&` (which only occur
/// inside JSON strings) become `\u003c`, `\u003e`, `\u0026`.
pub fn script_safe_json(v: &Value) -> String {
    v.to_string()
        .replace('<', "\\u003c")
        .replace('>', "\\u003e")
        .replace('&', "\\u0026")
}

/// The page's data: the metrics JSON plus history, process figures and admin counters.
pub fn stats_json(shared: &Shared) -> Value {
    let mut v = render::json(&shared.view);
    if let (Ok(h), Some(apps)) = (
        shared.history.lock(),
        v.get_mut("apps").and_then(Value::as_array_mut),
    ) {
        for app in apps {
            let name = app.get("name").and_then(Value::as_str).unwrap_or_default();
            let series = h.json(name);
            if let Some(o) = app.as_object_mut() {
                o.insert("history".into(), series);
            }
        }
    }
    let p = render::process_info();
    let c = &shared.counters;
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "process".into(),
            json!({
                "resident_memory_bytes": p.rss_bytes,
                "open_fds": p.open_fds,
                "max_fds": p.max_fds,
                "cpu_seconds": p.cpu_seconds,
            }),
        );
        let mut rejected = serde_json::Map::new();
        for (reason, n) in c.rejections() {
            rejected.insert(reason.into(), json!(n));
        }
        o.insert(
            "admin".into(),
            json!({"connections": c.accepted.load(Relaxed), "rejected": rejected}),
        );
    }
    v
}

/// The fallback for browsers without script: apps and targets with their state.
fn noscript(data: &Value) -> String {
    let mut o = String::from(
        "<noscript><p>This page refreshes with JavaScript; without it, reload it or read <a href=\"/metrics\">/metrics</a>.</p><ul>",
    );
    let empty = Vec::new();
    let apps = data.get("apps").and_then(Value::as_array).unwrap_or(&empty);
    let text = |v: &Value, k: &str| {
        html_escape(&match v.get(k) {
            Some(Value::String(s)) => s.clone(),
            Some(other) => other.to_string(),
            None => String::new(),
        })
    };
    for a in apps {
        let _ = write!(
            o,
            "<li>{}: {} live<ul>",
            text(a, "name"),
            text(a, "active_connections")
        );
        for t in a.get("targets").and_then(Value::as_array).unwrap_or(&empty) {
            let up = t.get("up").and_then(Value::as_bool).unwrap_or(false);
            let _ = write!(
                o,
                "<li>{} {}</li>",
                text(t, "address"),
                if up { "UP" } else { "DOWN" }
            );
        }
        o.push_str("</ul></li>");
    }
    o.push_str("</ul></noscript>");
    o
}

/// The whole page, with the current data embedded for the first paint.
pub fn html(shared: &Shared) -> String {
    let data = stats_json(shared);
    PAGE.replace("{{NOSCRIPT}}", &noscript(&data))
        .replace("{{DATA}}", &script_safe_json(&data))
}

const PAGE: &str = r##"<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>epoxy stats</title>
<style>
:root{--fg:#1d2330;--mut:#6b7383;--line:#d9dde5;--bg:#f5f6f8;--card:#fff;--up:#1f8a4c;--down:#c62828;--a:#2b6cb0;--b:#b7791f}
*{box-sizing:border-box}
body{margin:0;font:14px/1.4 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
header{display:flex;flex-wrap:wrap;gap:6px 24px;align-items:baseline;padding:12px 20px;background:#1d2330;color:#fff}
header h1{font-size:18px;margin:0}
header .kv{color:#c9d1e0}header .kv b{color:#fff;font-weight:600}
#stale{color:#ffb4b4;display:none}
main{padding:12px 20px 24px}
section.app,section.workers{background:var(--card);border:1px solid var(--line);border-radius:6px;margin:0 0 16px;padding:12px 14px}
h2{font-size:16px;margin:0 0 4px}h2 small{font-weight:400;color:var(--mut);font-size:13px;margin-left:8px}
.summary{display:flex;flex-wrap:wrap;gap:4px 22px;margin:6px 0 8px}
.summary span{color:var(--mut)}.summary b{color:var(--fg);font-variant-numeric:tabular-nums}
.charts{display:flex;flex-wrap:wrap;gap:16px;margin:4px 0 10px}
.chart{border:1px solid var(--line);border-radius:4px;padding:4px 6px;background:#fbfcfd}
.chart .t{font-size:12px;color:var(--mut)}.chart .t b{color:var(--fg)}
table{border-collapse:collapse;width:100%;font-variant-numeric:tabular-nums}
th,td{border-bottom:1px solid var(--line);padding:4px 8px;text-align:left;white-space:nowrap}
th{background:#eef1f5;font-weight:600;font-size:12px;color:#3c4454}
td.n,th.n{text-align:right}
.st{display:inline-block;min-width:48px;text-align:center;border-radius:3px;padding:0 6px;color:#fff;font-weight:600;font-size:12px}
.st.up{background:var(--up)}.st.down{background:var(--down)}
.closes{margin-top:8px;color:var(--mut);font-size:13px}.closes b{color:var(--fg)}.closes .z{opacity:.45}
.err{color:var(--down)}
</style></head>
<body>
<header><h1>epoxy <span id="version"></span></h1>
<span class="kv">uptime <b id="uptime"></b></span>
<span class="kv">live <b id="live"></b> / max <b id="max"></b></span>
<span class="kv">peak <b id="peak"></b></span>
<span class="kv">total <b id="total"></b></span>
<span class="kv">reloads <b id="reloads"></b></span>
<span class="kv">memory <b id="rss"></b></span>
<span class="kv">fds <b id="fds"></b></span>
<span class="kv" id="ready"></span>
<span id="stale">stale: last refresh failed</span></header>
<main><div id="apps"></div>
<section class="workers"><h2>Workers</h2><table><thead><tr><th>worker</th><th class="n">live</th><th class="n">total</th></tr></thead><tbody id="workers"></tbody></table></section>
</main>
{{NOSCRIPT}}
<script type="application/json" id="initial">{{DATA}}</script>
<script>
(function () {
  "use strict";
  function el(tag, cls, kids) {
    var e = document.createElement(tag);
    if (cls) e.className = cls;
    (kids || []).forEach(function (k) {
      e.appendChild(typeof k === "object" ? k : document.createTextNode(String(k)));
    });
    return e;
  }
  function num(n) { return Number(n || 0).toLocaleString("en-US"); }
  function bytes(n) {
    n = Number(n || 0);
    var u = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
    return (i ? n.toFixed(1) : String(Math.round(n))) + " " + u[i];
  }
  function dur(s) {
    s = Math.floor(Number(s || 0));
    var d = Math.floor(s / 86400), h = Math.floor(s % 86400 / 3600), m = Math.floor(s % 3600 / 60);
    if (d) return d + "d " + h + "h";
    if (h) return h + "h " + m + "m";
    if (m) return m + "m " + (s % 60) + "s";
    return s + "s";
  }
  function kv(label, value, cls) { return el("span", null, [label + " ", el("b", cls, [value])]); }
  var SVG = "http://www.w3.org/2000/svg";
  function chart(title, series, fmt, color) {
    var w = 300, h = 56, n = 300;
    var svg = document.createElementNS(SVG, "svg");
    svg.setAttribute("width", w); svg.setAttribute("height", h);
    svg.setAttribute("viewBox", "0 0 " + w + " " + h);
    var peak = Math.max.apply(null, [0].concat(series)), max = Math.max(peak, 1);
    var pts = series.map(function (v, i) {
      var x = w - (series.length - 1 - i) * (w / (n - 1));
      return x.toFixed(1) + "," + (h - 2 - (v / max) * (h - 6)).toFixed(1);
    });
    var base = document.createElementNS(SVG, "line");
    base.setAttribute("x1", 0); base.setAttribute("x2", w);
    base.setAttribute("y1", h - 1); base.setAttribute("y2", h - 1);
    base.setAttribute("stroke", "#d9dde5");
    svg.appendChild(base);
    if (pts.length > 1) {
      var line = document.createElementNS(SVG, "polyline");
      line.setAttribute("points", pts.join(" "));
      line.setAttribute("fill", "none"); line.setAttribute("stroke", color);
      line.setAttribute("stroke-width", "1.5");
      svg.appendChild(line);
    }
    var last = series.length ? series[series.length - 1] : 0;
    var t = el("div", "t", [title + " now ", el("b", null, [fmt(last)]), " · peak " + fmt(peak) + " · last 5 min"]);
    return el("div", "chart", [t, svg]);
  }
  function target(t) {
    var up = !!t.up;
    var status = el("span", "st status " + (up ? "up" : "down"), [up ? "UP" : "DOWN"]);
    var check = t.last_check ? t.last_check.result + " (" + dur(t.last_check.seconds_ago) + " ago)" : "passive";
    var e = t.connect_errors || {};
    var errs = Object.keys(e).map(function (k) { return k + " " + num(e[k]); }).join(" · ");
    var tr = el("tr", null, [
      el("td", null, [t.name]), el("td", "address", [t.address]), el("td", null, [status]),
      el("td", null, [dur(t.state_seconds)]), el("td", t.last_check && t.last_check.result !== "ok" ? "err" : null, [check]),
      el("td", "n", [num(t.weight)]), el("td", "n tlive", [num(t.active_connections)]), el("td", null, [errs])
    ]);
    tr.setAttribute("data-address", t.address);
    tr.setAttribute("data-status", up ? "UP" : "DOWN");
    return tr;
  }
  function app(a) {
    var hist = a.history || {};
    var head = el("tr", null, ["target", "address", "status", "since", "last check", "weight", "live", "connect errors"].map(function (h, i) {
      return el("th", i === 5 || i === 6 ? "n" : null, [h]);
    }));
    var closed = a.closed || {};
    var closes = el("div", "closes", ["closes: "]);
    Object.keys(closed).forEach(function (k, i) {
      if (i) closes.appendChild(document.createTextNode(" · "));
      closes.appendChild(el("span", closed[k] ? null : "z", [k + " ", el("b", null, [num(closed[k])])]));
    });
    var limit = a.max_connections == null ? "global" : num(a.max_connections);
    var s = el("section", "app", [
      el("h2", null, [el("span", "name", [a.name]), el("small", null, [a.balance + " · " + (a.listen || []).join(", ") + " · health " + a.health_checks])]),
      el("div", "summary", [
        kv("live", num(a.active_connections), "live"), kv("peak", num(a.peak_connections)), kv("limit", limit),
        kv("total", num(a.total_connections)), kv("in", bytes(a.bytes_upstream)), kv("out", bytes(a.bytes_downstream))
      ]),
      el("div", "charts", [
        chart("connections/s", hist.connections_per_second || [], function (v) { return (Math.round(v * 10) / 10).toString(); }, "#2b6cb0"),
        chart("bytes/s", hist.bytes_per_second || [], function (v) { return bytes(v) + "/s"; }, "#b7791f")
      ]),
      el("table", "targets", [el("thead", null, [head]), el("tbody", null, (a.targets || []).map(target))]),
      closes
    ]);
    s.setAttribute("data-app", a.name);
    s.setAttribute("data-live", String(a.active_connections));
    return s;
  }
  function set(id, text) { document.getElementById(id).textContent = text; }
  function render(d) {
    set("version", d.version);
    set("uptime", dur(d.uptime_seconds));
    set("live", num(d.active_connections)); set("max", num(d.max_connections));
    set("peak", num(d.peak_connections)); set("total", num(d.total_connections));
    var r = d.config_reloads || {};
    set("reloads", num(r.success) + " ok, " + num(r.failure) + " failed");
    var p = d.process || {};
    set("rss", bytes(p.resident_memory_bytes));
    set("fds", num(p.open_fds) + " / " + num(p.max_fds));
    set("ready", d.ready ? "serving" : "draining");
    document.getElementById("apps").replaceChildren.apply(document.getElementById("apps"), (d.apps || []).map(app));
    var ws = document.getElementById("workers");
    ws.replaceChildren.apply(ws, (d.workers || []).map(function (w) {
      return el("tr", null, [el("td", null, [w.worker]), el("td", "n", [num(w.active_connections)]), el("td", "n", [num(w.total_connections)])]);
    }));
    document.body.setAttribute("data-refreshed", String(Date.now()));
  }
  function refresh() {
    fetch("/stats?format=json", { cache: "no-store" })
      .then(function (r) { if (!r.ok) throw new Error(r.status); return r.json(); })
      .then(function (d) { render(d); document.getElementById("stale").style.display = "none"; })
      .catch(function () { document.getElementById("stale").style.display = "inline"; });
  }
  render(JSON.parse(document.getElementById("initial").textContent));
  setInterval(refresh, 2000);
})();
</script>
</body></html>
"##;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_escaped() {
        assert_eq!(
            html_escape("<script>a&\"b'</script>"),
            "&lt;script&gt;a&amp;&quot;b&#39;&lt;/script&gt;"
        );
        let v = json!({"name": "</script><script>alert(1)</script>&"});
        let s = script_safe_json(&v);
        assert!(
            !s.contains('<') && !s.contains('>') && !s.contains('&'),
            "{s}"
        );
        let back: Value = serde_json::from_str(&s).unwrap_or_default();
        assert_eq!(back, v);
    }
}
