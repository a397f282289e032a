#!/usr/bin/env python3
"""Turn the raw per-round rows of bench/run.sh into the results files.

Inputs (written by run.sh into its temporary directory):
  --raw       CSV phase,target,round,metric,value   (one row per measurement)
  --meta      "key<TAB>value" lines                  (machine, versions, settings)
  --commands  "phase<TAB>command" lines              (exact command lines)
  --notes     free text lines                        (skips, crashes, errors)
  --epoxy-logs  tail of epoxy's stderr per phase     (its shutdown summaries)
Outputs:
  --out BASE  BASE.md (report), BASE.csv (medians + ratios), BASE-raw.csv (every round)
  --chart F   SVG chart (gnuplot; matplotlib as fallback) of the throughput ratios to
              direct and the CPU per request of each proxy
Always prints a compact summary table to stdout.

Host CPU: run.sh records host-wide busy CPU (/proc/stat) per unit of work for every
target, direct included. "host extra" is a target's figure minus direct's figure of
the same phase and round (paired per round, then the median): the host CPU the proxy
path adds, kernel work charged outside the proxy process included.

Cheapest peer: for each (phase, metric), the better of pen and nginx on that figure
(the lower for CPU and latency, the higher for throughput); ratios to it are quoted
next to the ratios to HAProxy and to direct.
"""

import argparse
import csv
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from collections import OrderedDict, defaultdict

PHASES = OrderedDict([
    ("a", "keepalive 1 KiB, wrk -t1 -c50, pinned"),
    ("b", "keepalive 1 KiB, wrk -t1 -c1, unpinned (latency)"),
    ("c", "Connection: close (new TCP connection per request), wrk -t1 -c50, pinned"),
    ("d", "redis-benchmark -P 16 -t get,set, pinned"),
    ("e", "iperf3 bulk transfer, forward and reverse, pinned"),
    ("f", "idle established pairs (1 byte each way, then idle)"),
    ("g", "keepalive 64 KiB responses, wrk -t1 -c50, pinned (bulk over many connections)"),
    ("multiapp", "issue 3: 10 apps x 10 ports x 4 targets vs single app"),
    ("admin", "issue 4: admin endpoint scraped every second vs off"),
    ("scaling-ka", "issue 5: 1 vs 2 workers, keepalive"),
    ("scaling-close", "issue 5: 1 vs 2 workers, connection per request"),
    ("splice", "issue 5: iperf3 -l 64K, splice on/off"),
])

# metric -> (label, unit, better: "hi" | "lo" | "")
METRICS = {
    "rps": ("req/s", "req/s", "hi"),
    "p50_us": ("p50", "us", "lo"),
    "p99_us": ("p99", "us", "lo"),
    "added_p50_us": ("p50 added over direct", "us", "lo"),
    "added_p99_us": ("p99 added over direct", "us", "lo"),
    "cpu_us_per_req": ("proxy CPU per request", "us", "lo"),
    "proxy_cpu_pct": ("proxy CPU use", "% of a core", ""),
    "user_cpu_pct": ("proxy CPU in user space", "% of its CPU", ""),
    "errors": ("wrk errors", "", "lo"),
    "set_ops": ("SET", "ops/s", "hi"),
    "get_ops": ("GET", "ops/s", "hi"),
    "cpu_us_per_op": ("proxy CPU per op", "us", "lo"),
    "cpu_us_per_req_sched": ("proxy CPU per request, schedstat", "us", "lo"),
    "cpu_us_per_op_sched": ("proxy CPU per op, schedstat", "us", "lo"),
    "fwd_cpu_s_per_gb_sched": ("proxy CPU per GB, forward, schedstat", "s/GB", "lo"),
    "rev_cpu_s_per_gb_sched": ("proxy CPU per GB, reverse, schedstat", "s/GB", "lo"),
    "fwd_gbps": ("forward", "Gbit/s", "hi"),
    "rev_gbps": ("reverse (-R)", "Gbit/s", "hi"),
    "fwd_cpu_s_per_gb": ("proxy CPU per GB, forward", "s/GB", "lo"),
    "rev_cpu_s_per_gb": ("proxy CPU per GB, reverse", "s/GB", "lo"),
    "mb_s": ("payload throughput", "MB/s", "hi"),
    "cpu_s_per_gb": ("proxy CPU per GB", "s/GB", "lo"),
    "cpu_s_per_gb_sched": ("proxy CPU per GB, schedstat", "s/GB", "lo"),
    "host_cpu_s_per_gb": ("host CPU per GB", "s/GB", "lo"),
    "host_extra_s_per_gb": ("host CPU per GB over direct", "s/GB", "lo"),
    "pairs": ("idle pairs established", "", ""),
    "rss_before_kib": ("proxy RSS before", "KiB", ""),
    "rss_after_kib": ("proxy RSS after", "KiB", ""),
    "rss_bytes_per_pair": ("RSS per idle pair", "bytes", "lo"),
    "crashed": ("proxy died", "", "lo"),
    "host_cpu_us_per_req": ("host CPU per request", "us", "lo"),
    "host_extra_us_per_req": ("host CPU per request over direct", "us", "lo"),
    "host_cpu_pct": ("host CPU use", "% of a core", ""),
    "host_cpu_us_per_op": ("host CPU per op", "us", "lo"),
    "host_extra_us_per_op": ("host CPU per op over direct", "us", "lo"),
    "fwd_host_cpu_s_per_gb": ("host CPU per GB, forward", "s/GB", "lo"),
    "rev_host_cpu_s_per_gb": ("host CPU per GB, reverse", "s/GB", "lo"),
    "fwd_host_extra_s_per_gb": ("host CPU per GB over direct, forward", "s/GB", "lo"),
    "rev_host_extra_s_per_gb": ("host CPU per GB over direct, reverse", "s/GB", "lo"),
}

# The cheapest peers: each row's ratio is to the better of these two on that row's figure
CHEAP_PEERS = ("pen", "nginx")

# Baseline target of each hook phase (ratios in its summary table are to it)
HOOK_BASELINE = {"multiapp": "epoxy-single", "admin": "epoxy", "scaling-ka": "epoxy-w1",
                 "scaling-close": "epoxy-w1", "splice": "haproxy-splice"}

# Summary table rows: (phase, metric)
SUMMARY = [
    ("a", "rps"), ("a", "p50_us"), ("a", "p99_us"), ("a", "cpu_us_per_req"),
    ("a", "host_cpu_us_per_req"), ("a", "host_extra_us_per_req"),
    ("b", "p50_us"), ("b", "p99_us"), ("b", "added_p50_us"), ("b", "added_p99_us"),
    ("c", "rps"), ("c", "cpu_us_per_req"), ("c", "host_cpu_us_per_req"), ("c", "host_extra_us_per_req"),
    ("d", "set_ops"), ("d", "get_ops"), ("d", "cpu_us_per_op"), ("d", "cpu_us_per_op_sched"),
    ("d", "host_cpu_us_per_op"), ("d", "host_extra_us_per_op"),
    ("e", "fwd_gbps"), ("e", "fwd_cpu_s_per_gb"), ("e", "fwd_host_cpu_s_per_gb"), ("e", "fwd_host_extra_s_per_gb"),
    ("e", "rev_gbps"), ("e", "rev_cpu_s_per_gb"), ("e", "rev_host_cpu_s_per_gb"), ("e", "rev_host_extra_s_per_gb"),
    ("f", "rss_bytes_per_pair"), ("f", "pairs"),
    ("g", "mb_s"), ("g", "p99_us"), ("g", "cpu_s_per_gb"), ("g", "host_cpu_s_per_gb"), ("g", "host_extra_s_per_gb"),
]


def fmt(v, metric=""):
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    a = abs(v)
    if metric in ("rps", "set_ops", "get_ops", "pairs", "errors", "rss_before_kib", "rss_after_kib", "rss_bytes_per_pair"):
        return f"{v:,.0f}"
    if a >= 100:
        return f"{v:,.0f}"
    if a >= 10:
        return f"{v:.1f}"
    if a >= 1:
        return f"{v:.2f}"
    return f"{v:.3f}"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return None
    return a / b


def read_kv(path, sep="\t"):
    out = []
    if path and os.path.exists(path):
        for line in open(path):
            line = line.rstrip("\n")
            if sep in line:
                out.append(tuple(line.split(sep, 1)))
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--raw", required=True)
    ap.add_argument("--meta")
    ap.add_argument("--commands")
    ap.add_argument("--notes")
    ap.add_argument("--epoxy-logs")
    ap.add_argument("--profiles")
    ap.add_argument("--subject", default="epoxy")
    ap.add_argument("--out")
    ap.add_argument("--chart")
    a = ap.parse_args()
    subject = a.subject

    rows = list(csv.DictReader(open(a.raw)))
    vals = defaultdict(list)            # (phase, target, metric) -> [(round, value)]
    targets_order, phases_seen, metrics_seen = [], [], defaultdict(list)
    for r in rows:
        try:
            v = float(r["value"])
        except ValueError:
            continue
        vals[(r["phase"], r["target"], r["metric"])].append((r["round"], v))
        if r["target"] not in targets_order:
            targets_order.append(r["target"])
        if r["phase"] not in phases_seen:
            phases_seen.append(r["phase"])
        if r["metric"] not in metrics_seen[r["phase"]]:
            metrics_seen[r["phase"]].append(r["metric"])
    # canonical order: subject, peers, direct last
    order = [t for t in targets_order if t.startswith(subject)] + \
            [t for t in targets_order if not t.startswith(subject) and t != "direct"] + \
            [t for t in targets_order if t == "direct"]

    med = {}
    for k, lst in vals.items():
        med[k] = statistics.median(v for _, v in lst)

    # latency added over direct (phase b, and any phase with p50/p99 and a direct run)
    for ph in phases_seen:
        for m in ("p50_us", "p99_us"):
            d = med.get((ph, "direct", m))
            if d is None or ph != "b":
                continue
            for t in order:
                if t != "direct" and (ph, t, m) in med:
                    med[(ph, t, "added_" + m)] = med[(ph, t, m)] - d
                    # per round as well, pairing interleaved rounds
                    dr = dict(vals[(ph, "direct", m)])
                    vals[(ph, t, "added_" + m)] = [(rr, v - dr[rr]) for rr, v in vals[(ph, t, m)] if rr in dr]
            for extra in ("added_" + m,):
                if extra not in metrics_seen[ph]:
                    metrics_seen[ph].append(extra)

    # host CPU over direct: pair each round with direct's round of the same phase
    for ph in phases_seen:
        for m in list(metrics_seen[ph]):
            if "host_cpu_" not in m or m == "host_cpu_pct":
                continue
            xm = m.replace("host_cpu_", "host_extra_")
            dr = dict(vals.get((ph, "direct", m), []))
            if not dr:
                continue
            for t in order:
                if t == "direct" or (ph, t, m) not in vals:
                    continue
                pairs = [(rr, v - dr[rr]) for rr, v in vals[(ph, t, m)] if rr in dr]
                if not pairs:
                    continue
                vals[(ph, t, xm)] = pairs
                med[(ph, t, xm)] = statistics.median(v for _, v in pairs)
                if xm not in metrics_seen[ph]:
                    metrics_seen[ph].insert(metrics_seen[ph].index(m) + 1, xm)

    meta = OrderedDict(read_kv(a.meta))
    cmds = defaultdict(list)
    for ph, c in read_kv(a.commands):
        cmds[ph].append(c)
    notes = [l.rstrip("\n") for l in open(a.notes)] if a.notes and os.path.exists(a.notes) else []
    elog = open(a.epoxy_logs).read() if a.epoxy_logs and os.path.exists(a.epoxy_logs) else ""
    profiles = open(a.profiles).read() if a.profiles and os.path.exists(a.profiles) else ""

    peer = "haproxy" if "haproxy" in order else None
    cheap_in = [t for t in CHEAP_PEERS if t in order]

    def cheapest(ph, m):
        """(peer, value): the better of pen and nginx on this figure, or (None, None)."""
        better = METRICS.get(m, ("", "", ""))[2]
        cand = [(med[(ph, t, m)], t) for t in cheap_in if (ph, t, m) in med]
        if not cand or not better:
            return None, None
        v, t = min(cand) if better == "lo" else max(cand)
        return t, v

    def cheap_ratio(ph, t, m):
        """(ratio, peer) of target t to the cheapest peer; None where meaningless."""
        if t == "direct" or t in CHEAP_PEERS:
            return None, None
        cp, cv = cheapest(ph, m)
        if cp is None or (ph, t, m) not in med or cv <= 0:
            return None, cp
        return med[(ph, t, m)] / cv, cp

    # ------------------------------------------------------------ summary CSV
    csv_rows = []
    for ph in phases_seen:
        for m in metrics_seen[ph]:
            for t in order:
                if (ph, t, m) not in med:
                    continue
                v = med[(ph, t, m)]
                rd = ratio(v, med.get((ph, "direct", m))) if t != "direct" and not m.startswith("added_") else None
                rp = ratio(v, med.get((ph, peer, m))) if peer and t != peer and t != "direct" else None
                rc, cp = cheap_ratio(ph, t, m)
                csv_rows.append({
                    "phase": ph, "metric": m, "unit": METRICS.get(m, ("", "", ""))[1], "target": t,
                    "median": f"{v:.6g}", "rounds": len(vals[(ph, t, m)]),
                    "values": " ".join(f"{x:.6g}" for _, x in vals[(ph, t, m)]),
                    "ratio_to_direct": "" if rd is None else f"{rd:.4f}",
                    "ratio_to_haproxy": "" if rp is None else f"{rp:.4f}",
                    "cheapest_peer": "" if rc is None else cp,
                    "ratio_to_cheapest_peer": "" if rc is None else f"{rc:.4f}",
                })

    # ------------------------------------------------------------ summary tables (stdout + md)
    # One table for issue 2's phases (subject, peer, direct; ratios to the peer
    # and to direct), then one per hook phase with its own targets and a ratio
    # to that phase's baseline.
    def build_table(pairs, targets, base, vs_cheap=()):
        hdr = ["phase", "metric"] + targets
        others = [t for t in targets if t not in (base, "direct")]
        if base:
            hdr += [f"{t}/{base}" for t in others]
        hdr += [f"{t}/cheapest" for t in vs_cheap]
        if "direct" in targets:
            hdr += [f"{t}/direct" for t in targets if t != "direct"]
        lines = []
        for ph, m in pairs:
            if not any((ph, t, m) in med for t in targets):
                continue
            label, unit, _ = METRICS.get(m, (m, "", ""))
            row = [ph, f"{label}" + (f" ({unit})" if unit else "")]
            row += [fmt(med.get((ph, t, m)), m) for t in targets]
            if base:
                for t in others:
                    r = ratio(med.get((ph, t, m)), med.get((ph, base, m)))
                    row.append("-" if r is None else f"{r:.2f}")
            for t in vs_cheap:
                r, cp = cheap_ratio(ph, t, m)
                row.append("-" if r is None else f"{r:.2f} {cp}")
            if "direct" in targets:
                for t in targets:
                    if t == "direct":
                        continue
                    r = None if m.startswith("added_") else ratio(med.get((ph, t, m)), med.get((ph, "direct", m)))
                    row.append("-" if r is None else f"{r:.2f}")
            lines.append(row)
        return hdr, lines

    tables = []
    core = [p for p in phases_seen if p in ("a", "b", "c", "d", "e", "f", "g")]
    if core:
        ct = [t for t in order if any((p, t, m) in med for p in core for m in metrics_seen[p])]
        vc = [t for t in ct if t.startswith(subject)] if any(p in ct for p in CHEAP_PEERS) else []
        tables.append(("issue 2 phases", *build_table(SUMMARY, ct, peer if peer in ct else None, vc)))
    for ph in phases_seen:
        if ph in core:
            continue
        pt = [t for t in order if any((ph, t, m) in med for m in metrics_seen[ph])]
        base = HOOK_BASELINE.get(ph, pt[0] if pt else None)
        if base not in pt:
            base = pt[0] if pt else None
        tables.append((f"{ph}: {PHASES.get(ph, '')}", *build_table([(ph, m) for m in metrics_seen[ph]], pt, base)))

    def text_table(h, body):
        w = [max(len(str(x)) for x in col) for col in zip(h, *body)] if body else [len(x) for x in h]
        out = ["  ".join(str(x).ljust(w[i]) if i < 2 else str(x).rjust(w[i]) for i, x in enumerate(h))]
        out.append("  ".join("-" * x for x in w))
        for r in body:
            out.append("  ".join(str(x).ljust(w[i]) if i < 2 else str(x).rjust(w[i]) for i, x in enumerate(r)))
        return "\n".join(out)

    def md_table(h, body):
        out = ["| " + " | ".join(h) + " |", "|" + "|".join("---" if i < 2 else "--:" for i in range(len(h))) + "|"]
        for r in body:
            out.append("| " + " | ".join(str(x) for x in r) + " |")
        return "\n".join(out)

    # ------------------------------------------------------------ targets of issue 2
    checks = []
    if subject in order and peer and core:
        def chk(desc, ph, m, op, factor):
            s, p = med.get((ph, subject, m)), med.get((ph, peer, m))
            if s is None or p is None:
                checks.append((desc, "not measured", ""))
                return
            r = s / p if p else float("inf")
            ok = r <= factor if op == "<=" else r >= factor
            checks.append((desc, "met" if ok else "MISSED", f"{subject} {fmt(s, m)} vs {peer} {fmt(p, m)} = {r:.2f}x"))
        chk("(a) CPU per request <= 0.8x HAProxy", "a", "cpu_us_per_req", "<=", 0.8)
        chk("(c) CPU per request <= 0.8x HAProxy", "c", "cpu_us_per_req", "<=", 0.8)
        if ("d", subject, "cpu_us_per_op_sched") in med:
            # 400k ops cost ~30 ticks: tick-based figures are quantised to ~3%, so judge on schedstat ns
            chk("(d) CPU per op <= 0.8x HAProxy (schedstat ns; ticks too coarse here)", "d", "cpu_us_per_op_sched", "<=", 0.8)
        else:
            chk("(d) CPU per op <= 0.8x HAProxy", "d", "cpu_us_per_op", "<=", 0.8)
        chk("(a) req/s >= HAProxy", "a", "rps", ">=", 1.0)
        chk("(c) req/s >= HAProxy", "c", "rps", ">=", 1.0)
        s, p = med.get(("b", subject, "added_p50_us")), med.get(("b", peer, "added_p50_us"))
        if s is not None and p is not None:
            checks.append(("(b) p50 added <= HAProxy's", "met" if s <= p else "MISSED",
                           f"{subject} {s:+.1f} us vs {peer} {p:+.1f} us"))
        else:
            checks.append(("(b) p50 added <= HAProxy's", "not measured", ""))

    # Targets of issue 12: against the cheapest peer (pen or nginx, per figure), the best peer
    # (HAProxy included) and direct
    checks12 = []
    if subject in order and cheap_in:
        peers_all = [t for t in order if t != "direct" and not t.startswith(subject)]

        def best_peer(ph, m):
            better = METRICS.get(m, ("", "", ""))[2]
            cand = [(med[(ph, t, m)], t) for t in peers_all if (ph, t, m) in med]
            if not cand:
                return None, None
            v, t = max(cand) if better == "hi" else min(cand)
            return t, v

        def c12(desc, ph, m, factor, vs="cheap"):
            s = med.get((ph, subject, m))
            if vs == "cheap":
                cp, cv = cheapest(ph, m)
            elif vs == "best":
                cp, cv = best_peer(ph, m)
            else:
                cp, cv = vs, med.get((ph, vs, m))
            if s is None or cv is None or cv == 0:
                checks12.append((desc, "not measured", ""))
                return
            r = s / cv
            better = METRICS.get(m, ("", "", ""))[2]
            ok = r <= factor if better == "lo" else r >= factor
            checks12.append((desc, "met" if ok else "MISSED",
                             f"{subject} {fmt(s, m)} vs {cp} {fmt(cv, m)} = {r:.2f}x"))
        c12("(g) 64 KiB HTTP: proxy CPU per GB <= 0.6x cheapest peer", "g", "cpu_s_per_gb", 0.6)
        c12("(e) iperf3 fwd: proxy CPU per GB <= 0.6x cheapest peer", "e", "fwd_cpu_s_per_gb", 0.6)
        c12("(e) iperf3 rev: proxy CPU per GB <= 0.6x cheapest peer", "e", "rev_cpu_s_per_gb", 0.6)
        c12("(g) 64 KiB HTTP: MB/s >= best peer", "g", "mb_s", 1.0, "best")
        c12("(e) iperf3 fwd: Gbit/s >= best peer", "e", "fwd_gbps", 1.0, "best")
        c12("(e) iperf3 rev: Gbit/s >= best peer", "e", "rev_gbps", 1.0, "best")
        c12("(e) iperf3 fwd: Gbit/s >= 0.75x direct", "e", "fwd_gbps", 0.75, "direct")
        c12("(e) iperf3 rev: Gbit/s >= 0.75x direct", "e", "rev_gbps", 0.75, "direct")
        if peer:
            c12("(g) 64 KiB HTTP: p99 <= HAProxy's", "g", "p99_us", 1.0, peer)
        c12("(a) 1 KiB keepalive: proxy CPU per request <= 0.9x cheapest peer", "a", "cpu_us_per_req", 0.9)
        c12("(c) connection per request: proxy CPU per request <= 0.9x cheapest peer", "c", "cpu_us_per_req", 0.9)
        c12("(d) redis -P 16: proxy CPU per op <= 0.9x cheapest peer (schedstat)", "d", "cpu_us_per_op_sched", 0.9)
        c12("(a) host CPU per request over direct <= cheapest peer's", "a", "host_extra_us_per_req", 1.0)
        c12("(c) host CPU per request over direct <= cheapest peer's", "c", "host_extra_us_per_req", 1.0)
        c12("(d) host CPU per op over direct <= cheapest peer's", "d", "host_extra_us_per_op", 1.0)
        s = med.get(("f", subject, "rss_bytes_per_pair"))
        if s is not None:
            checks12.append(("(f) idle pair RSS <= 0.3 KiB", "met" if s <= 0.3 * 1024 else "MISSED",
                             f"{subject} {s:.0f} bytes"))

    # the subject against the cheapest peer, workload by workload (information, no target)
    vs_cheap = []
    if subject in order and cheap_in:
        for ph, m in SUMMARY:
            if m not in ("cpu_us_per_req", "cpu_us_per_op_sched", "fwd_cpu_s_per_gb", "rev_cpu_s_per_gb",
                         "host_extra_us_per_req", "host_extra_us_per_op", "fwd_host_extra_s_per_gb",
                         "rev_host_extra_s_per_gb", "rps", "fwd_gbps", "rev_gbps", "mb_s", "cpu_s_per_gb",
                         "host_extra_s_per_gb"):
                continue
            r, cp = cheap_ratio(ph, subject, m)
            if cp is None or (ph, subject, m) not in med:
                continue
            label, unit, _ = METRICS.get(m, (m, "", ""))
            vs_cheap.append(f"({ph}) {label}: {subject} {fmt(med[(ph, subject, m)], m)} vs {cp} "
                            f"{fmt(med[(ph, cp, m)], m)} {unit}" + ("" if r is None else f" = {r:.2f}x"))

    print()
    print(f"Summary (medians; {meta.get('settings', '')})")
    for title, hdr, lines in tables:
        print()
        print(f"[{title}]")
        print(text_table(hdr, lines))
    if checks:
        print()
        for d, st, detail in checks:
            print(f"  {st:12s} {d}  {detail}")
    if checks12:
        print()
        print("Targets of issue 12:")
        for d, st, detail in checks12:
            print(f"  {st:12s} {d}  {detail}")
    if vs_cheap:
        print()
        print("Against the cheapest peer (the better of pen and nginx on each figure):")
        for l in vs_cheap:
            print("  " + l)
    if notes:
        print()
        print("Notes:")
        for n in notes:
            print("  - " + n)

    if not a.out:
        if a.chart:  # regenerate just the chart from a -raw.csv
            make_chart(a.chart, med, order, subject)
        return

    # ------------------------------------------------------------ files
    base = a.out
    with open(base + ".csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["phase", "metric", "unit", "target", "median", "rounds", "values",
                                          "ratio_to_direct", "ratio_to_haproxy", "cheapest_peer",
                                          "ratio_to_cheapest_peer"])
        w.writeheader()
        w.writerows(csv_rows)
    shutil.copyfile(a.raw, base + "-raw.csv")

    chart_ok = None
    if a.chart:
        chart_ok = make_chart(a.chart, med, order, subject)

    md = []
    md.append(f"# epoxy benchmark, {meta.get('date', '')}")
    md.append("")
    md.append(f"Subject: **{subject}** ({meta.get('epoxy.version', 'n/a')}); peers measured in the same run: "
              + ", ".join(t for t in order if t != subject) + ".")
    md.append("Produced by `make bench` (`bash bench/run.sh`); every figure is the median of interleaved "
              "rounds (A B C A B C ...); per-round values are in the tables below and in the `-raw.csv`.")
    md.append("")
    md.append("## Machine")
    md.append("")
    for k in ("host.cpu", "host.nproc", "host.mem", "host.kernel", "host.os", "host.nofile", "haproxy", "pen",
              "nginx.stream", "wrk",
              "backend.nginx", "redis", "iperf3", "settings", "host.loadavg.start", "host.loadavg.end", "runtime.seconds"):
        if k in meta:
            md.append(f"- {k}: `{meta[k]}`")
    md.append("")
    if "host.busiest.start" in meta:
        md.append(f"Busiest processes when the run started (ps %CPU): `{meta['host.busiest.start']}`.")
        md.append("")
    md.append("**Noise.** This is a shared 2-core VM: other engineers run builds and tests on it at the same time, "
              "and throughput moves by +-20% between rounds. CPU time per request (utime+stime of the proxy process "
              "from /proc/PID/stat, in 1/CLK_TCK ticks, over the whole load run, divided by requests) is the "
              "figure that holds best; prefer it to req/s. Rows marked *schedstat* are the same quantity from "
              "/proc/PID/task/*/schedstat (nanoseconds), which resolves short runs where ticks are few (phase d). The load average before each phase is listed below. "
              "*Host CPU* rows are every CPU's busy time (user+nice+system+irq+softirq+steal of the `cpu` line of /proc/stat) "
              "over the same run, per unit of work: they include the load generator, the backend, kernel work charged outside "
              "the proxy (softirq, splice) and anything else running on the machine; *over direct* rows subtract the direct "
              "path's figure of the same round, which leaves what the proxy path adds.")
    md.append("")
    md.append("Layout: each proxy pinned with `taskset -c 0`; load generator and backend with `taskset -c 1` "
              "(phase b unpinned, see DESIGN.md section 7). Backends: nginx 1 KiB file over keepalive (18081), "
              "redis-server without persistence (18379), iperf3 -s (15201), bench/idle_pairs.py (18086). "
              f"{subject} listens on 18080, HAProxy on 18090, pen on 18095, nginx (stream, its own instance) on 18096.")
    md.append("")
    md.append("## Summary (medians)")
    md.append("")
    for title, hdr, lines in tables:
        if len(tables) > 1:
            md.append(f"**{title}**")
            md.append("")
        md.append(md_table(hdr, lines))
        md.append("")
    for issue, items in (("2", checks), ("12", checks12)):
        if items:
            md.append(f"### Targets of issue {issue} (ratios from this run)")
            md.append("")
            md.extend(f"- **{st}** {d}: {detail}" for d, st, detail in items)
            md.append("")
    if vs_cheap:
        md.append("### Against the cheapest peer (the better of pen and nginx on each figure)")
        md.append("")
        md.extend("- " + l for l in vs_cheap)
        md.append("")
    if chart_ok:
        md.append(f"![ratios to direct and CPU per request]({os.path.basename(a.chart)})")
        md.append("")
    md.append("## Phases, commands and per-round values")
    for ph in phases_seen + [p for p in cmds if p not in phases_seen]:
        md.append("")
        md.append(f"### ({ph}) {PHASES.get(ph, '')}")
        md.append("")
        if f"loadavg.before.{ph}" in meta:
            md.append(f"Load average before: `{meta[f'loadavg.before.{ph}']}`; phase took {meta.get(f'phase.{ph}.seconds', '?')} s.")
            md.append("")
        if cmds.get(ph):
            md.append("```")
            md.extend(cmds[ph])
            md.append("```")
            md.append("PORT: 18080 epoxy, 18090 haproxy, 18095 pen, 18096 nginx stream, the backend's own port for direct.")
            md.append("")
        if ph not in phases_seen:
            md.append("(no measurements: see notes)")
            continue
        h = ["metric", "target", "rounds", "median", "/ direct", "/ haproxy", "/ cheapest peer"]
        body = []
        for m in metrics_seen[ph]:
            for t in order:
                if (ph, t, m) not in med:
                    continue
                label, unit, _ = METRICS.get(m, (m, "", ""))
                v = med[(ph, t, m)]
                rd = None if m.startswith("added_") or t == "direct" else ratio(v, med.get((ph, "direct", m)))
                rp = None if t in ("direct", peer) or not peer else ratio(v, med.get((ph, peer, m)))
                rc, cp = cheap_ratio(ph, t, m)
                body.append([f"{label}" + (f" ({unit})" if unit else ""), t,
                             " / ".join(fmt(x, m) for _, x in vals[(ph, t, m)]), fmt(v, m),
                             "-" if rd is None else f"{rd:.2f}", "-" if rp is None else f"{rp:.2f}",
                             "-" if rc is None else f"{rc:.2f} ({cp})"])
        md.append(md_table(h, body))
    md.append("")
    md.append("## Notes from the run")
    md.append("")
    md.extend(["- " + n for n in notes] or ["- none (no skips, crashes or load-generator errors)"])
    if elog.strip():
        md.append("")
        md.append("## epoxy stderr at the end of each phase (its shutdown summaries)")
        md.append("")
        md.append("```")
        md.append(elog.rstrip())
        md.append("```")
    if profiles.strip():
        md.append("")
        md.append("## Profiles (PROFILE=1: one extra, unrecorded run per proxy under perf)")
        md.append("")
        md.append("```")
        md.append(profiles.rstrip())
        md.append("```")
    md.append("")
    md.append(f"Files: `{os.path.basename(base)}.csv` (medians and ratios), `{os.path.basename(base)}-raw.csv` "
              "(every round)" + (f", `{os.path.basename(a.chart)}` (chart)." if chart_ok else "."))
    with open(base + ".md", "w") as f:
        f.write("\n".join(md) + "\n")
    print()
    print(f"wrote {base}.md, {base}.csv, {base}-raw.csv" + (f", {a.chart}" if chart_ok else ""))


def make_chart(path, med, order, subject):
    # The issue-2 comparison: the subject, pen, nginx and HAProxy (hook phases have peers of their own
    # and tables in the report; mixing them in would leave most bars empty).
    proxies = [t for t in (subject, "pen", "nginx", "haproxy", "epoxy-splice", "haproxy-splice") if t in order]
    ratios = [("a", "rps", "(a) keepalive req/s"), ("c", "rps", "(c) conn/req req/s"),
              ("d", "set_ops", "(d) redis SET"), ("d", "get_ops", "(d) redis GET"),
              ("e", "fwd_gbps", "(e) iperf3 fwd"), ("e", "rev_gbps", "(e) iperf3 rev"),
              ("g", "mb_s", "(g) 64 KiB HTTP")]
    ratios = [r for r in ratios if ("direct" in order and (r[0], "direct", r[1]) in med)]
    cpu = [("a", "cpu_us_per_req", "(a) keepalive"), ("c", "cpu_us_per_req", "(c) conn/req"),
           ("d", "cpu_us_per_op", "(d) redis op")]
    cpu = [c for c in cpu if any((c[0], t, c[1]) in med for t in proxies)]
    gb = [("e", "fwd_cpu_s_per_gb", "(e) iperf3 fwd"), ("e", "rev_cpu_s_per_gb", "(e) iperf3 rev"),
          ("g", "cpu_s_per_gb", "(g) 64 KiB HTTP")]
    gb = [c for c in gb if any((c[0], t, c[1]) in med for t in proxies)]
    # gnuplot aborts a plot with a column of nothing but NaN: keep proxies measured here.
    proxies = [t for t in proxies
               if any((ph, t, m) in med for ph, m, _ in ratios)
               and (not cpu or any((ph, t, m) in med for ph, m, _ in cpu))]
    if not proxies or (not ratios and not cpu):
        return False
    tmp = tempfile.mkdtemp(prefix="epoxy-chart.")
    f1, f2, f3 = os.path.join(tmp, "ratios.dat"), os.path.join(tmp, "cpu.dat"), os.path.join(tmp, "gb.dat")

    def val(k):
        v = med.get(k)
        return "NaN" if v is None else f"{v:.6g}"

    with open(f1, "w") as f:
        f.write("label " + " ".join(proxies) + "\n")
        for ph, m, lab in ratios:
            f.write(f'"{lab}" ' + " ".join(
                "NaN" if (ph, t, m) not in med else f"{med[(ph, t, m)] / med[(ph, 'direct', m)]:.4f}" for t in proxies) + "\n")
    with open(f2, "w") as f:
        f.write("label " + " ".join(proxies) + "\n")
        for ph, m, lab in cpu:
            f.write(f'"{lab}" ' + " ".join(val((ph, t, m)) for t in proxies) + "\n")
    with open(f3, "w") as f:
        f.write("label " + " ".join(proxies) + "\n")
        for ph, m, lab in gb:
            f.write(f'"{lab}" ' + " ".join(val((ph, t, m)) for t in proxies) + "\n")
    colors = ["#1f77b4", "#8c564b", "#2ca02c", "#ff7f0e", "#d62728", "#9467bd"]
    if shutil.which("gnuplot"):
        def plot_cmd(fn):
            parts = []
            for i, t in enumerate(proxies):
                src = f"'{fn}'" if i == 0 else "''"
                parts.append(f"{src} using {i + 2}:xtic(1) title '{t}' lc rgb '{colors[i % len(colors)]}'")
            return "plot " + ", ".join(parts)
        gp = f"""
set terminal svg size 1500,460 dynamic font 'sans,11' background rgb 'white'
set output '{path}'
set multiplot layout 1,3 title 'epoxy vs peers, medians of one run (loopback, proxy pinned to one core)'
set style data histogram
set style histogram cluster gap 1
set style fill solid 0.85 border -1
set boxwidth 0.9
set key top right
set grid ytics
set xtics rotate by -25 scale 0
set yrange [0:*]
set key autotitle columnhead
set title 'Throughput as a fraction of direct (higher is better)'
set ylabel 'ratio to direct'
{plot_cmd(f1) if ratios else "unset border; plot NaN notitle"}
set title 'Proxy CPU time per request / op (lower is better, log scale)'
set logscale y
set yrange [0.1:*]
set ylabel 'microseconds of CPU'
{plot_cmd(f2) if cpu else "plot NaN notitle"}
unset logscale y
set yrange [0:*]
set title 'Proxy CPU time per GB moved (lower is better)'
set ylabel 'seconds of CPU per GB'
{plot_cmd(f3) if gb else "plot NaN notitle"}
unset multiplot
"""
        r = subprocess.run(["gnuplot"], input=gp, text=True, capture_output=True)
        shutil.rmtree(tmp, ignore_errors=True)
        if r.returncode == 0 and os.path.exists(path):
            return True
        print("gnuplot failed: " + r.stderr[-500:], file=sys.stderr)
        return False
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("no gnuplot or matplotlib: chart skipped", file=sys.stderr)
        return False
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.6))
    for ax, rowsdef, title, yl, isratio in ((axes[0], ratios, "Throughput / direct (higher is better)", "ratio", True),
                                            (axes[1], cpu, "Proxy CPU per request/op (lower is better)", "us", False),
                                            (axes[2], gb, "Proxy CPU per GB (lower is better)", "s/GB", False)):
        wdt = 0.8 / max(1, len(proxies))
        for i, t in enumerate(proxies):
            ys = []
            for ph, m, _ in rowsdef:
                v = med.get((ph, t, m))
                if isratio and v is not None:
                    v = v / med[(ph, "direct", m)]
                ys.append(float("nan") if v is None else v)
            ax.bar([j + i * wdt for j in range(len(rowsdef))], ys, wdt, label=t, color=colors[i % len(colors)])
        ax.set_xticks([j + wdt * (len(proxies) - 1) / 2 for j in range(len(rowsdef))])
        ax.set_xticklabels([lab for _, _, lab in rowsdef], rotation=25, ha="right")
        ax.set_title(title)
        ax.set_ylabel(yl)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    shutil.rmtree(tmp, ignore_errors=True)
    return True


if __name__ == "__main__":
    main()
