#!/usr/bin/env python3
"""Idle established pairs, for the RSS-per-idle-pair phase (f) of bench/run.sh.

Two roles, loopback only:

  idle_pairs.py server --port P
      Accepts connections and holds them. For every byte a client sends it
      answers one byte, so both directions of a proxied pair have carried data
      (and a proxy's buffers have been touched) before the pair goes idle.
      Prints "listening" once ready. Runs until killed.

  idle_pairs.py client --port P -n N [--hold SECONDS]
      Opens N connections one after another (blocking, with timeouts, so no
      listen backlog overflows), sends 1 byte on each and waits for the 1-byte
      answer. Prints "established K" (K <= N; fewer if something failed, with
      the reason on stderr) and then holds every connection open until stdin
      reaches EOF, SIGTERM arrives, or --hold seconds pass.

Both raise their soft RLIMIT_NOFILE to the hard limit first: each process has
its own limit, so client, proxy and server can each hold ~N descriptors.
"""

import argparse
import resource
import selectors
import signal
import socket
import sys
import time


def raise_nofile():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def serve(host, port):
    raise_nofile()
    sel = selectors.DefaultSelector()
    lsock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    lsock.bind((host, port))
    lsock.listen(4096)
    lsock.setblocking(False)
    sel.register(lsock, selectors.EVENT_READ, None)
    print("listening", flush=True)
    held = 0
    while True:
        for key, _ in sel.select():
            if key.data is None:
                while True:
                    try:
                        conn, _ = lsock.accept()
                    except (BlockingIOError, InterruptedError):
                        break
                    except OSError as e:  # EMFILE and friends: back off
                        print(f"accept: {e}", file=sys.stderr, flush=True)
                        time.sleep(0.05)
                        break
                    conn.setblocking(False)
                    sel.register(conn, selectors.EVENT_READ, "c")
                    held += 1
            else:
                conn = key.fileobj
                try:
                    data = conn.recv(4096)
                except (BlockingIOError, InterruptedError):
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(conn)
                    conn.close()
                    held -= 1
                    continue
                try:
                    conn.send(b"y" * len(data))
                except OSError:
                    pass


def client(host, port, n, hold, timeout):
    limit = raise_nofile()
    if n + 16 > limit:
        print(f"client: RLIMIT_NOFILE {limit} < {n} connections; capping", file=sys.stderr)
        n = max(0, limit - 16)
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    conns = []
    t0 = time.monotonic()
    for i in range(n):
        s = None
        try:
            s = socket.create_connection((host, port), timeout=timeout)
            s.sendall(b"x")
            got = s.recv(1)
            if got != b"y":
                raise OSError(f"expected 1 byte back, got {got!r}")
        except OSError as e:
            print(f"client: connection {i}: {e}", file=sys.stderr, flush=True)
            if s is not None:
                s.close()
            break
        conns.append(s)
    dt = time.monotonic() - t0
    print(f"established {len(conns)} in {dt:.2f}s", flush=True)
    deadline = time.monotonic() + hold
    sel = selectors.DefaultSelector()
    sel.register(sys.stdin, selectors.EVENT_READ)
    while not stop and time.monotonic() < deadline:
        if sel.select(timeout=0.2):
            if not sys.stdin.buffer.read1(4096):
                break
    for s in conns:
        s.close()


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("role", choices=["server", "client"])
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("-n", type=int, default=1000)
    ap.add_argument("--hold", type=float, default=600.0)
    ap.add_argument("--timeout", type=float, default=5.0)
    a = ap.parse_args()
    if a.role == "server":
        serve(a.host, a.port)
    else:
        client(a.host, a.port, a.n, a.hold, a.timeout)


if __name__ == "__main__":
    main()
