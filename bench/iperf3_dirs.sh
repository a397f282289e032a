#!/usr/bin/env bash
# bench/iperf3_dirs.sh — does iperf3's reverse direction cost more through epoxy than the
# forward one (issue 12 left that open)? iperf3 -s runs on CPU 1, epoxy (defaults) pinned to
# CPU 0, the iperf3 client on CPU 1. Rounds interleave direct and epoxy, forward and -R.
# Prints Gbit/s, epoxy's CPU per GB (/proc/PID/stat) and host-wide CPU per GB (/proc/stat,
# all CPUs, busy time). With PERF=1 it then records `perf record -a -g` for 3 s of each
# direction through epoxy and prints the top symbols by command, side by side.
# Usage: bash bench/iperf3_dirs.sh [ROUNDS]   (EPOXY_BIN=target/release/proxy by default)
set -uo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${EPOXY_BIN:-$ROOT/target/release/proxy}
ROUNDS=${1:-3} SECS=${IPERF_TIME:-5}
P_SRV=${P_SRV:-18301} P_PROXY=${P_PROXY:-18302}
for t in iperf3 python3; do command -v "$t" >/dev/null || { echo "missing: $t" >&2; exit 1; }; done
[ -x "$BIN" ] || { echo "no epoxy binary at $BIN (cargo build --release)" >&2; exit 1; }
TMP=$(mktemp -d /tmp/epoxy-iperf3.XXXXXX)
PIDS=()
trap 'kill "${PIDS[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$TMP"' EXIT
taskset -c 1 iperf3 -s -B 127.0.0.1 -p "$P_SRV" >"$TMP/server.log" 2>&1 &
PIDS+=($!)
taskset -c 0 "$BIN" -l 127.0.0.1 -p "$P_PROXY" -b 127.0.0.1 -P "$P_SRV" 2>"$TMP/proxy.log" &
PX=$!
PIDS+=($PX)
for _ in $(seq 100); do
    grep -q "listening" "$TMP/proxy.log" 2>/dev/null && break
    sleep 0.05
done
grep -q "listening" "$TMP/proxy.log" || { echo "epoxy did not start:" >&2; cat "$TMP/proxy.log" >&2; exit 1; }
HZ=$(getconf CLK_TCK)
host_ticks() { awk '/^cpu /{print $2+$3+$4+$7+$8}' /proc/stat; }
proxy_ticks() { awk '{print $14+$15}' "/proc/$PX/stat"; }
# once TARGET PORT fwd|rev
once() {
    local rf=""
    [ "$3" = rev ] && rf="-R"
    local h0 p0 h1 p1
    h0=$(host_ticks) p0=$(proxy_ticks)
    timeout $((SECS + 30)) taskset -c 1 iperf3 -c 127.0.0.1 -p "$2" -t "$SECS" -J $rf >"$TMP/run.json" 2>&1
    h1=$(host_ticks) p1=$(proxy_ticks)
    python3 - "$1" "$3" "$SECS" "$HZ" "$((h1 - h0))" "$((p1 - p0))" "$TMP/run.json" <<'PY'
import json, sys
name, d, secs, hz, host, proxy, path = sys.argv[1:]
try:
    b = json.load(open(path))["end"]["sum_received"]["bytes"]
except (OSError, ValueError, KeyError):
    print(f"{name:<7}{d:<5} iperf3 failed"); sys.exit(0)
gb = b / 1e9
print(f"{name:<7}{d:<5}{b * 8 / float(secs) / 1e9:7.2f} Gbit/s   epoxy {int(proxy) / int(hz) / gb:.3f} s/GB"
      f"   host {int(host) / int(hz) / gb:.3f} s/GB")
PY
}
for r in $(seq "$ROUNDS"); do
    echo "# round $r"
    for d in fwd rev; do
        once direct "$P_SRV" "$d"
        once epoxy "$P_PROXY" "$d"
    done
done
if [ "${PERF:-0}" = 1 ] && command -v perf >/dev/null; then
    for d in fwd rev; do
        rf=""
        [ "$d" = rev ] && rf="-R"
        (sleep 1; perf record -a -g -o "$TMP/perf-$d.data" -- sleep 3 >/dev/null 2>&1) &
        PP=$!
        taskset -c 1 iperf3 -c 127.0.0.1 -p "$P_PROXY" -t "$SECS" $rf >/dev/null 2>&1
        wait "$PP"
        echo "# perf, $d through epoxy (no children; comm, symbol)"
        perf report -i "$TMP/perf-$d.data" --no-children --sort comm,sym --stdio 2>/dev/null \
            | grep -E '^ +[0-9.]+%' | head -10
    done
fi
