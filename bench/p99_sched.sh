#!/usr/bin/env bash
# bench/p99_sched.sh — where the 64 KiB keepalive tail latency comes from (issue 12).
# For each proxy (epoxy with its defaults, HAProxy mode tcp): nginx serves a 64 KiB file on
# CPU 1, the proxy runs pinned to CPU 0, `wrk -t1 -c50` runs on CPU 1, and `perf sched record`
# covers 3 s of the load. Prints wrk's p50/p99 and, per task, the scheduler's average and
# maximum wake-up delay (`perf sched latency`). Needs root (perf), wrk, nginx, haproxy.
# Usage: bash bench/p99_sched.sh [ROUNDS]   (EPOXY_BIN=target/release/proxy by default)
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${EPOXY_BIN:-$ROOT/target/release/proxy}
ROUNDS=${1:-1}
P_BACK=${P_BACK:-18281} P_PROXY=${P_PROXY:-18280}
for t in perf wrk nginx haproxy; do command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }; done
[ -x "$BIN" ] || { echo "no epoxy binary at $BIN (cargo build --release)" >&2; exit 1; }
TMP=$(mktemp -d /tmp/epoxy-p99.XXXXXX); chmod 755 "$TMP"
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$TMP"' EXIT
mkdir -p "$TMP/www" "$TMP/tmp"
head -c 65536 /dev/urandom >"$TMP/www/64k.bin"
cat >"$TMP/nginx.conf" <<C
worker_processes 1; daemon off; pid $TMP/nginx.pid; error_log $TMP/error.log warn;
events { worker_connections 4096; }
http { access_log off; sendfile on; tcp_nodelay on; keepalive_requests 10000000;
  client_body_temp_path $TMP/tmp;
  server { listen 127.0.0.1:$P_BACK; root $TMP/www; location / { } } }
C
cat >"$TMP/haproxy.cfg" <<C
global
    nbthread 1
defaults
    mode tcp
    timeout connect 5s
    timeout client 1h
    timeout server 1h
frontend fe
    bind 127.0.0.1:$P_PROXY
    default_backend be
backend be
    server s1 127.0.0.1:$P_BACK
C
taskset -c 1 nginx -p "$TMP" -c "$TMP/nginx.conf" -e "$TMP/error.log" & PIDS+=($!)
wait_port() { for _ in $(seq 100); do ss -Hltn "sport = :$1" | grep -q . && return 0; sleep 0.05; done; return 1; }
wait_port "$P_BACK" || { echo "nginx did not start" >&2; exit 1; }
for ((r = 1; r <= ROUNDS; r++)); do
    for name in epoxy haproxy; do
        if [ "$name" = epoxy ]; then
            taskset -c 0 "$BIN" -l 127.0.0.1 -p "$P_PROXY" -b 127.0.0.1 -P "$P_BACK" >"$TMP/$name.log" 2>&1 &
        else
            taskset -c 0 haproxy -db -f "$TMP/haproxy.cfg" >"$TMP/$name.log" 2>&1 &
        fi
        px=$!
        wait_port "$P_PROXY" || { echo "$name did not start" >&2; exit 1; }
        taskset -c 1 wrk -t1 -c50 -d6s --latency "http://127.0.0.1:$P_PROXY/64k.bin" >"$TMP/wrk.txt" &
        wk=$!
        sleep 1.5
        (cd "$TMP" && perf sched record -o "$TMP/sched.data" -- sleep 3 >/dev/null 2>&1)
        wait "$wk"
        kill "$px"; wait "$px" 2>/dev/null
        echo "== round $r, $name: $(awk '/^Requests/ {print $2}' "$TMP/wrk.txt") req/s, p50 $(awk '$1=="50%" {print $2}' "$TMP/wrk.txt"), p99 $(awk '$1=="99%" {print $2}' "$TMP/wrk.txt")"
        perf sched latency -i "$TMP/sched.data" --sort max 2>/dev/null \
            | awk -F'|' '/(wrk|nginx|epoxy-worker-[0-9]+|haproxy):/ { gsub(/ +/, " "); printf "   %-24s runtime%s switches%s avg delay%s max delay%s\n", $1, $2, $3, $4, $5 }'
        wait_port_free() { for _ in $(seq 100); do ss -Hltn "sport = :$1" | grep -q . || return 0; sleep 0.05; done; }
        wait_port_free "$P_PROXY"
    done
done
