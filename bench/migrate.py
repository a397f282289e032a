#!/usr/bin/env python3
"""Upgrade with live-pair migration at scale: N established pairs (default 5,000) through
the release binary, SIGUSR2, and what it costs them.

Reports, for one run:
  - the old process's own figures: pairs moved, batches, time, per-pair parked time
    p50/p99/max (from its `upgrade: moved ...` log line: the time between a pair's worker
    deregistering it and the commit to the new process);
  - client-side stall: PROBES of the pairs ping-pong 64 bytes every 2 ms through the
    upgrade; the longest gap between answers on each probe (p50/p99/max over probes) against
    the same figure for a quiet window before the upgrade;
  - how long until the old process is gone, and a check that every one of the N pairs still
    echoes afterwards (through the new process).

Usage: python3 bench/migrate.py [--pairs 5000] [--probes 100] [--workers 1] [--proxy PATH]
Needs the open-files limit above 2*N+100 (the script raises its soft limit to the hard one).
Prints a Markdown table; writes nothing else.
"""
import argparse
import json
import os
import re
import resource
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request


def echo_backend(stop):
    """A selectors echo server on 127.0.0.1:0 (its own thread); returns the port."""
    ls = socket.socket()
    ls.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    ls.bind(("127.0.0.1", 0))
    ls.listen(4096)
    ls.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(ls, selectors.EVENT_READ, None)

    def run():
        while not stop.is_set():
            for key, _ in sel.select(0.1):
                if key.data is None:
                    while True:
                        try:
                            c, _ = ls.accept()
                        except BlockingIOError:
                            break
                        c.setblocking(False)
                        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                        sel.register(c, selectors.EVENT_READ, b"")
                else:
                    c = key.fileobj
                    try:
                        d = c.recv(65536)
                    except (BlockingIOError, ConnectionError):
                        continue
                    if not d:
                        sel.unregister(c)
                        c.close()
                        continue
                    try:
                        c.sendall(d)
                    except OSError:
                        pass

    threading.Thread(target=run, daemon=True).start()
    return ls.getsockname()[1]


def admin_json(admin):
    with urllib.request.urlopen(f"http://{admin}/metrics?format=json", timeout=5) as r:
        return json.load(r)


def pct(xs, p):
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, len(xs) * p // 100)]


def probe(sock, stop, gaps, start_flag):
    """Ping-pong 64 bytes every 2 ms; record the longest gap between answers while the
    window is open."""
    sock.settimeout(30)
    msg = b"p" * 64
    worst = 0.0
    last = time.monotonic()
    while not stop.is_set():
        sock.sendall(msg)
        got = b""
        while len(got) < 64:
            d = sock.recv(64 - len(got))
            if not d:
                raise RuntimeError("probe closed")
            got += d
        now = time.monotonic()
        if start_flag.is_set():
            worst = max(worst, now - last)
        last = now
        time.sleep(0.002)
    gaps.append(worst)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--pairs", type=int, default=5000)
    ap.add_argument("--probes", type=int, default=100)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--proxy", default="target/release/proxy")
    a = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

    stop = threading.Event()
    bport = echo_backend(stop)
    cfg = tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False)
    cfg.write(
        f'[defaults]\ngrace_period = "60s"\nworkers = {a.workers}\n'
        f'[admin]\nlisten = "127.0.0.1:0"\n'
        f'[[app]]\nname = "bench"\nlisten = ["127.0.0.1:0"]\ntargets = ["127.0.0.1:{bport}"]\n'
    )
    cfg.close()
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)
    env = dict(os.environ, RUST_LOG="info")
    p = subprocess.Popen([a.proxy, "-c", cfg.name], stderr=log, stdout=subprocess.DEVNULL, env=env)
    deadline = time.time() + 20
    addr = admin = None
    while time.time() < deadline and not (addr and admin):
        text = open(log.name).read()
        m = re.search(r"listening on (\S+) ->", text)
        addr = m and m.group(1)
        m = re.search(r"admin endpoint on http://([^/]+)/", text)
        admin = m and m.group(1)
        time.sleep(0.05)
    if not (addr and admin):
        sys.exit("proxy did not start:\n" + open(log.name).read())
    host, port = addr.rsplit(":", 1)
    port = int(port)

    conns = []
    for i in range(a.pairs):
        s = socket.create_connection((host, port), timeout=10)
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conns.append(s)
    # Every pair established end to end: one echo each.
    for s in conns:
        s.sendall(b"x")
    for s in conns:
        s.settimeout(10)
        if s.recv(1) != b"x":
            sys.exit("echo failed before the upgrade")
    while admin_json(admin)["active_connections"] < a.pairs:
        time.sleep(0.05)

    def window(seconds, signal_at=None):
        gaps = []
        stop_p = threading.Event()
        started = threading.Event()
        ts = [threading.Thread(target=probe, args=(conns[i], stop_p, gaps, started))
              for i in range(a.probes)]
        for t in ts:
            t.start()
        time.sleep(0.3)  # probes warmed up
        started.set()
        t0 = time.monotonic()
        if signal_at is not None:
            time.sleep(signal_at)
            signal_at = time.monotonic()
            p.send_signal(signal.SIGUSR2)
        while time.monotonic() - t0 < seconds:
            time.sleep(0.05)
        stop_p.set()
        for t in ts:
            t.join()
        return gaps, signal_at

    quiet, _ = window(2.0)
    old_pid = p.pid
    exited = []
    watcher = threading.Thread(target=lambda: (p.wait(), exited.append(time.monotonic())))
    watcher.start()
    loud, sent_at = window(4.0, signal_at=0.5)
    watcher.join(timeout=30)
    gone = exited[0] - sent_at if exited else None
    new_pid = admin_json(admin)["pid"]
    # Every pair still echoes, through the new process.
    for s in conns:
        s.sendall(b"y")
    bad = 0
    for s in conns:
        try:
            if s.recv(1) != b"y":
                bad += 1
        except OSError:
            bad += 1
    text = open(log.name).read()
    m = re.search(r"moved (\d+) live connection\(s\) to PID \d+ in (\d+) batch\(es\) in (\S+) "
                  r"\(parked p50 (\d+) us, p99 (\d+) us, max (\d+) us\)", text)
    if not m:
        sys.exit("no migration line in the log:\n" + text[-3000:])
    moved, batches, took, p50, p99, mx = m.groups()
    print(f"| figure | value |\n|---|--:|")
    print(f"| live pairs | {a.pairs} (workers {a.workers}) |")
    print(f"| moved / batches / time (old process) | {moved} / {batches} / {took} |")
    print(f"| parked per pair p50 / p99 / max (old process) | {int(p50)/1000:.2f} / {int(p99)/1000:.2f} / {int(mx)/1000:.2f} ms |")
    print(f"| probe worst gap, quiet window: p50 / p99 / max over {a.probes} probes | "
          f"{pct(quiet,50)*1000:.1f} / {pct(quiet,99)*1000:.1f} / {max(quiet)*1000:.1f} ms |")
    print(f"| probe worst gap, across the upgrade: p50 / p99 / max | "
          f"{pct(loud,50)*1000:.1f} / {pct(loud,99)*1000:.1f} / {max(loud)*1000:.1f} ms |")
    print(f"| old process gone after SIGUSR2 | {gone if gone is None else f'{gone:.2f} s'} (PID {old_pid} -> {new_pid}) |")
    print(f"| pairs that failed to echo after the upgrade | {bad} |")
    for s in conns:
        s.close()
    try:
        os.kill(new_pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    stop.set()
    os.unlink(cfg.name)
    if bad:
        sys.exit(1)


if __name__ == "__main__":
    main()
