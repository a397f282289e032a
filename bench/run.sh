#!/usr/bin/env bash
# bench/run.sh — load benchmarks of epoxy against the cheapest peers (pen, nginx
# stream), HAProxy and the direct path, in one run, on loopback. Called by `make bench`.
#
# What it measures (issue 2, "Benchmark"; DESIGN.md section 7):
#   a  wrk keepalive, 1 KiB response, -t1 -c50        req/s, p50, p99, proxy CPU us/request
#   b  wrk -t1 -c1, everything unpinned               p50/p99 and latency added over direct
#   c  wrk, "Connection: close" (TCP conn/request)    req/s, proxy CPU us/request
#   d  redis-benchmark -P 16 -t get,set               ops/s, proxy CPU us/op
#   e  iperf3 forward and -R                          Gbit/s, proxy CPU s/GB
#   f  idle established pairs (bench/idle_pairs.py)   proxy RSS bytes per idle pair
#   g  wrk keepalive, 64 KiB response, -t1 -c50       MB/s, p99, proxy and host CPU s/GB
# Hooks for later issues (opt-in through PHASES, skipped when the proxy lacks
# the feature): multiapp (issue 3), admin (issue 4), scaling and splice (issue 5),
# edge (issue 9: PROXY protocol both ways + a 1,000-entry allow list, chained epoxies).
#
# Layout: each proxy is pinned with `taskset -c $PROXY_CPU` (0), load generator
# and backend with `taskset -c $LOAD_CPU` (1) — except phase b, which runs
# unpinned (DESIGN.md section 7: pinned single-connection latency measures
# cross-CPU wake-ups). Rounds are interleaved (A B C A B C ...) and the report
# quotes medians. The proxy's CPU time is utime+stime from /proc/PID/stat
# (ticks / CLK_TCK) sampled around each load run. Host-wide CPU is read from the
# aggregate `cpu` line of /proc/stat (user+nice+system+irq+softirq+steal) around
# the same runs: it includes the load generator, the backend and kernel work
# charged outside the proxy (softirq, splice), so report.py quotes it per unit of
# work minus the direct path's figure of the same round ("host extra").
#
# Peers: haproxy (mode tcp, nbthread 1), pen (single process, -O tcp_nodelay) and
# nginx (stream module, one process: master_process off), each pinned like epoxy.
#
# Environment (all optional):
#   DURATION=10        seconds per wrk run (phases a b c)
#   ROUNDS=3           interleaved rounds per phase
#   IPERF_TIME=5       seconds per iperf3 run
#   REDIS_N=200000     requests per redis-benchmark test
#   PAIRS=9000         idle pairs for phase f
#   QUICK=1            smoke run (~2 min): DURATION=3 ROUNDS=1 IPERF_TIME=2 REDIS_N=50000 PAIRS=2000
#   PHASES="a b c d e f g" which phases (add: multiapp admin scaling splice)
#   TARGETS="epoxy pen nginx haproxy direct"  which peers (nginx = nginx stream proxy,
#                      not the phase a-c HTTP backend, which is a separate instance)
#   SUBJECT=epoxy      the proxy under test; SUBJECT=socat uses socat as a stand-in
#                      (harness development only: socat forks per connection)
#   EPOXY_BIN=target/release/proxy   EPOXY_ARGS="..." extra flags for epoxy
#   HAPROXY_SPLICE=0   1 = `option splice-auto` in the HAProxy config
#   NO_BUILD=1         skip `cargo build --release`
#   NO_INSTALL=1       do not run scripts/install-bench-deps.sh when tools are missing
#   RESULTS_DIR=bench/results   NO_RESULTS=1 (print only, write nothing there)
#   KEEP_TMP=1         keep the temporary directory (configs, logs)
#   PROFILE=1          after the rounds of phases a b c, one extra (unrecorded) wrk run per
#                      proxy under `perf record`; flat profiles go into the results file
set -uo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT" || exit 1

# ---------------------------------------------------------------- settings
if [ "${QUICK:-0}" = 1 ]; then
    : "${DURATION:=3}" "${ROUNDS:=1}" "${IPERF_TIME:=2}" "${REDIS_N:=50000}" "${PAIRS:=2000}" "${WARMUP:=1}"
fi
DURATION=${DURATION:-10}
ROUNDS=${ROUNDS:-3}
IPERF_TIME=${IPERF_TIME:-5}
REDIS_N=${REDIS_N:-200000}
PAIRS=${PAIRS:-9000}
WARMUP=${WARMUP:-2}
PHASES=${PHASES:-"a b c d e f g"}
SUBJECT=${SUBJECT:-epoxy}
TARGETS=${TARGETS:-"$SUBJECT pen nginx haproxy direct"}
EPOXY_BIN=${EPOXY_BIN:-$ROOT/target/release/proxy}
EPOXY_ARGS=${EPOXY_ARGS:-}
HAPROXY_SPLICE=${HAPROXY_SPLICE:-0}
RESULTS_DIR=${RESULTS_DIR:-$ROOT/bench/results}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
WRK_CONNS=${WRK_CONNS:-50}

# Loopback ports (each can be overridden from the environment, e.g. P_IPERF=15211 when
# something else on a shared machine holds the default; a busy port skips what needs it).
P_EPOXY=${P_EPOXY:-18080}
P_EPOXY2=${P_EPOXY2:-18070}      # epoxy variants (hooks) use 18071-18074, so they can run beside plain epoxy
P_HAPROXY=${P_HAPROXY:-18090}
P_HAPROXY2=${P_HAPROXY2:-18091}  # haproxy-splice
P_SOCAT=${P_SOCAT:-18085}
P_PEN=${P_PEN:-18095}            # pen
P_NGINXS=${P_NGINXS:-18096}      # nginx stream (the proxy target; P_NGINX is the HTTP backend)
P_NGINX=${P_NGINX:-18081}        # phase multiapp adds the next 3 ports
P_REDIS=${P_REDIS:-18379}
P_IPERF=${P_IPERF:-15201}
P_HOLD=${P_HOLD:-18086}          # idle_pairs.py server
P_ADMIN=${P_ADMIN:-19090}        # epoxy admin endpoint (issue 4 hook)
HOST=127.0.0.1

CLK_TCK=$(getconf CLK_TCK)
STAMP=$(date -u +%Y%m%d-%H%M%S)
SHORT=$(git rev-parse --short HEAD 2>/dev/null || echo nogit)
git diff --quiet HEAD -- src Cargo.toml 2>/dev/null || SHORT="$SHORT-dirty"
[ -n "$(git ls-files --others --exclude-standard src 2>/dev/null)" ] && [[ $SHORT != *-dirty ]] && SHORT="$SHORT-dirty"

TMP=$(mktemp -d /tmp/epoxy-bench.XXXXXX)
RAW=$TMP/raw.csv            # phase,target,round,metric,value
META=$TMP/meta.txt          # "key<TAB>value"
CMDS=$TMP/commands.txt      # "phase<TAB>command"
NOTES=$TMP/notes.txt        # free text: skips, crashes, errors
LOGS=$TMP/logs
mkdir -p "$LOGS"
chmod 755 "$TMP"            # nginx workers (user nobody) read the 1 KiB file under it
echo "phase,target,round,metric,value" >"$RAW"
: >"$META"; : >"$CMDS"; : >"$NOTES"

log()  { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
note() { log "$*"; printf '%s\n' "$*" >>"$NOTES"; }
meta() { printf '%s\t%s\n' "$1" "$2" >>"$META"; }
cmd()  { printf '%s\t%s\n' "$1" "$2" >>"$CMDS"; }
rec()  { printf '%s,%s,%s,%s,%s\n' "$1" "$2" "$3" "$4" "$5" >>"$RAW"; }
have() { command -v "$1" >/dev/null 2>&1; }
calc() { awk "BEGIN { printf \"%.6g\", $* }"; }

# ---------------------------------------------------------------- process bookkeeping
# Every process we start is recorded here and killed on exit, by pid.
PIDS=()
track() { PIDS+=("$1"); }

kill_pid() {  # kill_pid PID [grace_seconds]: TERM, wait, then KILL
    local pid=$1 grace=${2:-3} i
    [ -n "$pid" ] || return 0
    kill -0 "$pid" 2>/dev/null || { wait "$pid" 2>/dev/null; return 0; }
    kill -TERM "$pid" 2>/dev/null
    for ((i = 0; i < grace * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        kill -KILL "$pid" 2>/dev/null
        note "pid $pid did not exit within ${grace}s of SIGTERM; killed"
    fi
    wait "$pid" 2>/dev/null
    return 0
}

cleanup() {
    local rc=$? p
    trap - EXIT INT TERM
    for p in "${PIDS[@]}"; do
        kill -0 "$p" 2>/dev/null && kill -TERM "$p" 2>/dev/null
    done
    sleep 0.3
    for p in "${PIDS[@]}"; do
        kill -0 "$p" 2>/dev/null && kill -KILL "$p" 2>/dev/null
    done
    if [ "${KEEP_TMP:-0}" = 1 ]; then log "temporary files kept in $TMP"; else rm -rf "$TMP"; fi
    exit "$rc"
}
trap cleanup EXIT
trap 'log "interrupted"; exit 130' INT TERM

# Every process is started as `taskset -c CPUS prog ...` (taskset execs, so $!
# is the program's own pid); "unpinned" means all CPUs.
ALLCPUS="0-$(($(nproc) - 1))"

cpu_ticks() {  # utime+stime of a whole process (all threads), in clock ticks
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo $(( ${12} + ${13} ))
}
cpu_ns() {     # on-CPU nanoseconds summed over the process's threads (/proc/PID/task/*/schedstat);
    local f a s=0  # finer than ticks: used as a cross-check where ticks are few (phase d)
    for f in /proc/"$1"/task/*/schedstat; do read -r a _ <"$f" 2>/dev/null && s=$((s + a)); done
    echo "$s"
}
user_ticks() {  # utime alone, for the user/kernel split
    local s
    s=$(cat "/proc/$1/stat" 2>/dev/null) || { echo 0; return; }
    s=${s##*) }
    # shellcheck disable=SC2086
    set -- $s
    echo "${12}"
}
host_ticks() {  # host-wide busy CPU, all CPUs: user+nice+system+irq+softirq+steal of /proc/stat's
    local l       # `cpu` line, in clock ticks (guest time is already inside user)
    read -r l </proc/stat
    # shellcheck disable=SC2086
    set -- $l
    echo $(( $2 + $3 + $4 + $7 + $8 + $9 ))
}
rss_kib() { awk '/^VmRSS:/ { print $2 }' "/proc/$1/status" 2>/dev/null || echo 0; }

port_listening() { ss -Hltn "sport = :$1" 2>/dev/null | grep -q .; }
wait_port() {  # wait_port PORT PID TIMEOUT_S: until PORT listens; fail if PID died
    local port=$1 pid=$2 t=${3:-10} i
    for ((i = 0; i < t * 20; i++)); do
        port_listening "$port" && return 0
        [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null && return 1
        sleep 0.05
    done
    return 1
}
wait_port_free() {  # up to 5 s (a process of ours that just stopped may still hold it)
    local port=$1 i
    for ((i = 0; i < 100; i++)); do port_listening "$port" || return 0; sleep 0.05; done
    return 1
}
# port_mine PORT WHAT: fail (with a note) when something else still listens on PORT: wait_port
# would take that listener for ours, and the run would measure someone else's process
port_mine() {
    wait_port_free "$1" && return 0
    note "phase $CURRENT_PHASE: $2 not started: port $1 is held by another process ($(ss -Hltnp "sport = :$1" 2>/dev/null | grep -o 'users:.*' | head -1)); override with P_* variables"
    return 1
}

# ---------------------------------------------------------------- backends
BACKEND_PID=""
start_nginx() {  # start_nginx CPUSET [extra listen ports...]; NGINX_PP_PORT: one more, with proxy_protocol
    local cpus=$1; shift
    local d=$TMP/nginx listens="listen $HOST:$P_NGINX;" p
    for p in "$@"; do listens="$listens listen $HOST:$p;"; done
    [ -n "${NGINX_PP_PORT:-}" ] && listens="$listens listen $HOST:$NGINX_PP_PORT proxy_protocol;"
    port_mine "$P_NGINX" "nginx backend" || return 1
    for p in "$@"; do port_mine "$p" "nginx backend" || return 1; done
    mkdir -p "$d/www" "$d/tmp"
    head -c 1024 /dev/zero | tr '\0' 'x' >"$d/www/1k.bin"
    head -c 65536 /dev/urandom >"$d/www/64k.bin"
    cat >"$d/nginx.conf" <<EOF
worker_processes 1;
daemon off;
pid $d/nginx.pid;
error_log $d/error.log warn;
worker_rlimit_nofile 20000;
events { worker_connections 8192; }
http {
    access_log off;
    sendfile on;
    tcp_nodelay on;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_temp_path $d/tmp;
    server {
        $listens
        root $d/www;
        location / { }
    }
}
EOF
    taskset -c "${cpus:-$ALLCPUS}" nginx -p "$d" -c "$d/nginx.conf" -e "$d/error.log" >>"$LOGS/nginx.log" 2>&1 &
    BACKEND_PID=$!; track "$BACKEND_PID"
    wait_port "$P_NGINX" "$BACKEND_PID" 10 || { note "nginx did not start: $(tail -3 "$d/error.log" "$LOGS/nginx.log" 2>/dev/null)"; return 1; }
    meta "backend.nginx" "nginx $(nginx -v 2>&1 | sed 's/.*version: //'), worker_processes 1, access_log off, 1 KiB file, keepalive; config $d/nginx.conf"
}
start_redis() {
    port_mine "$P_REDIS" redis-server || return 1
    taskset -c "$LOAD_CPU" redis-server --port "$P_REDIS" --bind "$HOST" --save '' --appendonly no \
        --protected-mode no --daemonize no --dir "$TMP" --logfile "$LOGS/redis.log" &
    BACKEND_PID=$!; track "$BACKEND_PID"
    wait_port "$P_REDIS" "$BACKEND_PID" 10 || { note "redis-server did not start"; return 1; }
}
start_iperf_server() {
    port_mine "$P_IPERF" "iperf3 -s" || return 1
    taskset -c "$LOAD_CPU" iperf3 -s -B "$HOST" -p "$P_IPERF" >>"$LOGS/iperf3-server.log" 2>&1 &
    BACKEND_PID=$!; track "$BACKEND_PID"
    wait_port "$P_IPERF" "$BACKEND_PID" 10 || { note "iperf3 -s did not start"; return 1; }
}
start_holder() {
    port_mine "$P_HOLD" "idle_pairs.py server" || return 1
    taskset -c "$LOAD_CPU" python3 "$ROOT/bench/idle_pairs.py" server --port "$P_HOLD" >>"$LOGS/holder.log" 2>&1 &
    BACKEND_PID=$!; track "$BACKEND_PID"
    wait_port "$P_HOLD" "$BACKEND_PID" 10 || { note "idle_pairs.py server did not start"; return 1; }
}
stop_backend() { kill_pid "$BACKEND_PID" 5; BACKEND_PID=""; }

# ---------------------------------------------------------------- proxies (targets)
# A target is a name; start_target sets T_PID[name] and T_PORT[name].
# Variants (epoxy-admin, epoxy-w2, epoxy-splice, haproxy-splice) serve the hooks.
declare -A T_PID T_PORT T_LOG

epoxy_ok=0
epoxy_has_flag() { [ "$epoxy_ok" = 1 ] && "$EPOXY_BIN" --help 2>&1 | grep -q -e "$1"; }

haproxy_cfg() {  # haproxy_cfg FILE BACKEND_PORT SPLICE(0|1) LISTEN_PORT
    # maxconn 9900 lets HAProxy hold phase f's ~9000 idle pairs within the
    # 20000-fd hard limit (it wants ~2 fds per conn); splice also needs pipes
    # (2 fds each, maxpipes defaults to maxconn/4), so splice runs use less.
    local splice_line="no option splice-auto" maxconn=9900
    [ "$3" = 1 ] && { splice_line="option splice-auto"; maxconn=6000; }
    cat >"$1" <<EOF
global
    nbthread 1
    maxconn $maxconn
    log stderr format short local0 err
defaults
    mode tcp
    log global
    timeout connect 5s
    timeout client 1h
    timeout server 1h
    $splice_line
frontend fe
    bind $HOST:$4
    maxconn $maxconn
    default_backend be
backend be
    server s1 $HOST:$2 maxconn $maxconn
EOF
}

# nginx's stream module: built in (--with-stream), a dynamic module (--with-stream=dynamic,
# Debian's libnginx-mod-stream) or absent. Prints the load_module line the config needs.
nginx_stream_load() {
    local v mp f
    have nginx || return 1
    v=$(nginx -V 2>&1)
    if grep -qE -- '--with-stream( |$)' <<<"$v"; then echo ""; return 0; fi
    grep -qE -- '--with-stream=dynamic( |$)' <<<"$v" || return 1
    mp=$(grep -oE -- '--modules-path=[^ ]+' <<<"$v" | cut -d= -f2)
    for f in "${mp:-/usr/lib/nginx/modules}/ngx_stream_module.so" /usr/lib/nginx/modules/ngx_stream_module.so; do
        [ -f "$f" ] && { echo "load_module $f;"; return 0; }
    done
    return 1
}
nginx_stream_cfg() {  # nginx_stream_cfg DIR BACKEND_PORT LISTEN_PORT LOAD_LINE
    # A separate instance from the HTTP backend (start_nginx): own prefix, pid file, error log.
    # master_process off: one process does the proxying, so /proc/PID/stat of the pid we
    # started is the whole of nginx's CPU (with a master, the worker's time would be missed).
    local d=$1
    mkdir -p "$d/logs"
    cat >"$d/nginx.conf" <<EOF
$4
daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 20000;
pid $d/nginx.pid;
error_log $d/error.log warn;
events { worker_connections 20000; }
stream {
    server {
        listen $HOST:$3;
        proxy_pass $HOST:$2;
        tcp_nodelay on;
    }
}
EOF
}

start_target() {  # start_target NAME BACKEND_PORT CPUSET -> 0 if running
    local name=$1 bport=$2 cpus=$3 pid port logf=$LOGS/$1-$CURRENT_PHASE.log extra="" ngx_dir=""
    case $name in
        direct)
            T_PID[$name]=""; T_PORT[$name]=$bport; return 0 ;;
        epoxy|epoxy-*)
            [ "$epoxy_ok" = 1 ] || { note "phase $CURRENT_PHASE: $name skipped (no working epoxy binary)"; return 1; }
            port=$P_EPOXY
            case $name in
                epoxy-admin)  extra="--admin $HOST:$P_ADMIN"; port=$((P_EPOXY2 + 1)) ;;
                epoxy-w1)     extra="--workers 1";            port=$((P_EPOXY2 + 2)) ;;
                epoxy-w2)     extra="--workers 2";            port=$((P_EPOXY2 + 3)) ;;
                epoxy-splice) extra="--splice";               port=$((P_EPOXY2 + 4)) ;;
            esac
            port_mine "$port" "$name" || return 1
            # shellcheck disable=SC2086
            RUST_LOG=${RUST_LOG:-info} taskset -c "${cpus:-$ALLCPUS}" "$EPOXY_BIN" -l "$HOST" -p "$port" -b "$HOST" -P "$bport" \
                $EPOXY_ARGS $extra >"$logf" 2>&1 &
            pid=$! ;;
        haproxy|haproxy-splice)
            have haproxy || { note "phase $CURRENT_PHASE: $name skipped (haproxy not installed)"; return 1; }
            port=$P_HAPROXY
            local splice=$HAPROXY_SPLICE
            [ "$name" = haproxy-splice ] && { splice=1; port=$P_HAPROXY2; }
            haproxy_cfg "$TMP/haproxy-$CURRENT_PHASE-$name.cfg" "$bport" "$splice" "$port"
            port_mine "$port" "$name" || return 1
            taskset -c "${cpus:-$ALLCPUS}" haproxy -db -f "$TMP/haproxy-$CURRENT_PHASE-$name.cfg" >"$logf" 2>&1 &
            pid=$! ;;
        pen)
            have pen || { note "phase $CURRENT_PHASE: pen skipped (not installed)"; return 1; }
            port=$P_PEN
            port_mine "$port" "$name" || return 1
            # -f foreground, -r no client tracking (one backend), -x connection limit,
            # -q listen backlog, -O tcp_nodelay: TCP_NODELAY on the listener (inherited) and upstream
            taskset -c "${cpus:-$ALLCPUS}" pen -f -r -x 10000 -q 1024 -O tcp_nodelay "$HOST:$port" "$HOST:$bport" >"$logf" 2>&1 &
            pid=$! ;;
        nginx)
            local load
            load=$(nginx_stream_load) || { note "phase $CURRENT_PHASE: nginx skipped (no nginx with the stream module; Debian: libnginx-mod-stream)"; return 1; }
            port=$P_NGINXS
            ngx_dir=$TMP/nginx-stream-$CURRENT_PHASE
            nginx_stream_cfg "$ngx_dir" "$bport" "$port" "$load"
            port_mine "$port" "$name" || return 1
            taskset -c "${cpus:-$ALLCPUS}" nginx -p "$ngx_dir" -c "$ngx_dir/nginx.conf" -e "$ngx_dir/error.log" >"$logf" 2>&1 &
            pid=$! ;;
        socat)
            have socat || { note "phase $CURRENT_PHASE: socat skipped (not installed)"; return 1; }
            port=$P_SOCAT
            port_mine "$port" "$name" || return 1
            taskset -c "${cpus:-$ALLCPUS}" socat "TCP-LISTEN:$port,bind=$HOST,reuseaddr,fork,backlog=1024" "TCP:$HOST:$bport,nodelay" >"$logf" 2>&1 &
            pid=$! ;;
        *)
            note "unknown target $name"; return 1 ;;
    esac
    track "$pid"
    if ! wait_port "$port" "$pid" 10; then
        note "phase $CURRENT_PHASE: $name did not start listening on $port; log tail: $(tail -q -n 5 "$logf" ${ngx_dir:+"$ngx_dir/error.log"} 2>/dev/null | tr '\n' ' ')"
        kill_pid "$pid" 2
        return 1
    fi
    T_PID[$name]=$pid; T_PORT[$name]=$port; T_LOG[$name]=$logf
    return 0
}

stop_target() {
    local name=$1 pid=${T_PID[$1]:-}
    [ -n "$pid" ] || return 0
    kill_pid "$pid" 10
    T_PID[$name]=""
    # keep the proxy's exit summary (epoxy prints one on SIGTERM)
    if [[ $name == epoxy* ]] && [ -s "${T_LOG[$name]}" ]; then
        # start-up lines, warnings/errors, and the shutdown summary (not the periodic stats lines)
        { echo "--- $name, phase $CURRENT_PHASE"
          grep -E ' (WARN|ERROR) |started|panic' "${T_LOG[$name]}" | head -n 20
          awk '/shutting down/ { p = 1 } p' "${T_LOG[$name]}" | head -n 30
        } >>"$TMP/epoxy-logs.txt"
    fi
    if grep -qiE 'panick|panic|segfault|backtrace' "${T_LOG[$name]:-/dev/null}" 2>/dev/null; then
        note "phase $CURRENT_PHASE: $name log mentions a panic: $(grep -iE -m2 'panic' "${T_LOG[$name]}")"
    fi
}

# alive NAME ROUND: after a load run, make sure the proxy survived it
alive() {
    local name=$1 pid=${T_PID[$1]:-}
    [ -z "$pid" ] && return 0
    if ! kill -0 "$pid" 2>/dev/null; then
        wait "$pid" 2>/dev/null; local rc=$?
        note "phase $CURRENT_PHASE round $2: $name DIED (exit status $rc); log tail: $(tail -5 "${T_LOG[$name]}" | tr '\n' ' ')"
        rec "$CURRENT_PHASE" "$name" "$2" crashed 1
        T_PID[$name]=""
        return 1
    fi
    return 0
}

# start every target in TARGETS for this phase; prints the ones running
start_targets() {  # start_targets BACKEND_PORT CPUSET -> sets RUNNING
    local t
    RUNNING=()
    for t in $TARGETS; do
        start_target "$t" "$1" "$2" && RUNNING+=("$t")
    done
}
stop_targets() { local t; for t in $TARGETS; do stop_target "$t"; done; }

# ---------------------------------------------------------------- load runners
to_us() {  # "123.45us" | "1.2ms" | "2.00s" -> microseconds
    awk -v v="$1" 'BEGIN { n = v + 0; u = v; sub(/^[0-9.]+/, "", u);
        if (u == "us") m = 1; else if (u == "ms") m = 1000; else if (u == "s") m = 1000000; else if (u == "m") m = 60000000; else m = 1;
        printf "%.1f", n * m }'
}

# wrk_once PHASE NAME ROUND CPUSET_LOAD CONNS DURATION [extra wrk args...]
wrk_once() {
    local phase=$1 name=$2 round=$3 cpus=$4 conns=$5 dur=$6; shift 6
    local port=${T_PORT[$name]} pid=${T_PID[$name]:-} out=$TMP/wrk.out t0 t1 n0 n1 perfpid=""
    if [ "$round" = profile ]; then
        perf record -F 999 -g -p "$pid" -o "$TMP/perf-$phase-$name.data" -- sleep "$dur" >/dev/null 2>&1 &
        perfpid=$!; track "$perfpid"
        sleep 0.2
    fi
    local u0 u1 h0 h1
    t0=$( [ -n "$pid" ] && cpu_ticks "$pid" || echo 0); n0=$( [ -n "$pid" ] && cpu_ns "$pid" || echo 0)
    u0=$( [ -n "$pid" ] && user_ticks "$pid" || echo 0)
    h0=$(host_ticks)
    timeout $((dur + 30)) taskset -c "${cpus:-$ALLCPUS}" \
        wrk -t"${WRK_THREADS:-1}" -c"$conns" -d"${dur}s" --latency "$@" "http://$HOST:$port/${WRK_FILE:-1k.bin}" >"$out" 2>&1
    local rc=$?
    h1=$(host_ticks)
    t1=$( [ -n "$pid" ] && cpu_ticks "$pid" || echo 0); n1=$( [ -n "$pid" ] && cpu_ns "$pid" || echo 0)
    u1=$( [ -n "$pid" ] && user_ticks "$pid" || echo 0)
    [ "$round" = warmup ] && { alive "$name" warmup; return 0; }
    if [ "$round" = profile ]; then
        wait "$perfpid" 2>/dev/null
        save_profile "$phase" "$name" "$TMP/perf-$phase-$name.data"
        alive "$name" profile; return 0
    fi
    if [ $rc -ne 0 ]; then note "phase $phase round $round: wrk against $name exited $rc: $(tail -3 "$out" | tr '\n' ' ')"; fi
    local reqs rps p50 p99 errs non2xx
    reqs=$(awk '/requests in/ { print $1 }' "$out")
    rps=$(awk '/^Requests\/sec:/ { print $2 }' "$out")
    p50=$(awk '$1 == "50%" { print $2 }' "$out")
    p99=$(awk '$1 == "99%" { print $2 }' "$out")
    errs=$(awk '/Socket errors:/ { gsub(",", ""); print $4 + $6 + $8 + $10 }' "$out")
    non2xx=$(awk '/Non-2xx/ { print $NF }' "$out")
    errs=$(( ${errs:-0} + ${non2xx:-0} ))
    if [ -z "$reqs" ] || [ "${reqs:-0}" = 0 ]; then
        note "phase $phase round $round: no requests completed against $name: $(tr '\n' ' ' <"$out" | cut -c1-300)"
        alive "$name" "$round"; return 1
    fi
    rec "$phase" "$name" "$round" rps "$rps"
    rec "$phase" "$name" "$round" p50_us "$(to_us "$p50")"
    rec "$phase" "$name" "$round" p99_us "$(to_us "$p99")"
    rec "$phase" "$name" "$round" errors "$errs"
    [ "$errs" -gt 0 ] && note "phase $phase round $round: $name: $errs wrk errors ($(grep -E 'Socket errors|Non-2xx' "$out" | tr '\n' ' '))"
    if [ -n "$pid" ]; then
        rec "$phase" "$name" "$round" cpu_us_per_req "$(calc "($t1 - $t0) / $CLK_TCK * 1e6 / $reqs")"
        rec "$phase" "$name" "$round" proxy_cpu_pct "$(calc "($t1 - $t0) / $CLK_TCK / $dur * 100")"
        rec "$phase" "$name" "$round" cpu_us_per_req_sched "$(calc "($n1 - $n0) / 1000 / $reqs")"
        [ "$t1" -gt "$t0" ] && rec "$phase" "$name" "$round" user_cpu_pct "$(calc "($u1 - $u0) * 100 / ($t1 - $t0)")"
    fi
    # host-wide: every CPU's busy time (proxy, wrk, backend, kernel), direct included
    rec "$phase" "$name" "$round" host_cpu_us_per_req "$(calc "($h1 - $h0) / $CLK_TCK * 1e6 / $reqs")"
    rec "$phase" "$name" "$round" host_cpu_pct "$(calc "($h1 - $h0) / $CLK_TCK / $dur * 100")"
    if [ -n "${WRK_BYTES:-}" ]; then          # bulk responses: payload throughput and CPU per GB
        rec "$phase" "$name" "$round" mb_s "$(calc "$reqs * $WRK_BYTES / $dur / 1e6")"
        [ -n "$pid" ] && rec "$phase" "$name" "$round" cpu_s_per_gb "$(calc "($t1 - $t0) / $CLK_TCK / ($reqs * $WRK_BYTES / 1e9)")"
        [ -n "$pid" ] && rec "$phase" "$name" "$round" cpu_s_per_gb_sched "$(calc "($n1 - $n0) / 1e9 / ($reqs * $WRK_BYTES / 1e9)")"
        rec "$phase" "$name" "$round" host_cpu_s_per_gb "$(calc "($h1 - $h0) / $CLK_TCK / ($reqs * $WRK_BYTES / 1e9)")"
    fi
    log "  $phase r$round $name: $rps req/s p50 $p50 p99 $p99 cpu $(( t1 - t0 )) ticks (host $(( h1 - h0 ))) errs $errs"
    alive "$name" "$round"
}

# wrk_phase PHASE CONNS PINNED(1|0) [extra wrk args...]
wrk_phase() {
    local phase=$1 conns=$2 pinned=$3; shift 3
    local pcpu="" lcpu="" t r
    if [ "$pinned" = 1 ]; then pcpu=$PROXY_CPU; lcpu=$LOAD_CPU; fi
    have wrk || { note "phase $phase skipped: wrk not installed"; return; }
    have nginx || { note "phase $phase skipped: nginx not installed"; return; }
    start_nginx "$lcpu" || return
    start_targets "$P_NGINX" "$pcpu"
    local pin_txt="taskset -c $LOAD_CPU "; [ "$pinned" = 1 ] || pin_txt=""
    cmd "$phase" "${pin_txt}wrk -t1 -c$conns -d${DURATION}s --latency $* http://$HOST:PORT/${WRK_FILE:-1k.bin}"
    for t in "${RUNNING[@]}"; do wrk_once "$phase" "$t" warmup "$lcpu" "$conns" "$WARMUP" "$@"; done
    for ((r = 1; r <= ROUNDS; r++)); do
        for t in "${RUNNING[@]}"; do
            [ "$t" = direct ] || [ -n "${T_PID[$t]:-}" ] || continue
            wrk_once "$phase" "$t" "$r" "$lcpu" "$conns" "$DURATION" "$@"
            sleep 0.5
        done
    done
    if [ "${PROFILE:-0}" = 1 ] && have perf; then    # extra, unrecorded run under perf
        for t in "${RUNNING[@]}"; do
            [ "$t" = direct ] || [ -z "${T_PID[$t]:-}" ] && continue
            wrk_once "$phase" "$t" profile "$lcpu" "$conns" "$DURATION" "$@"
            have strace && syscalls_once "$phase" "$t" "$lcpu" "$conns" "$@"
        done
    fi
    stop_targets
    stop_backend
}

proxy_cmdline_notes() {
    local pc=$1 phase=$2
    local p="taskset -c $pc "; [ -n "$pc" ] || p=""
    [[ " $TARGETS " == *" epoxy "* ]] && cmd "$phase" "${p}$EPOXY_BIN -l $HOST -p $P_EPOXY -b $HOST -P BACKEND $EPOXY_ARGS"
    [[ " $TARGETS " == *" haproxy "* ]] && cmd "$phase" "${p}haproxy -db -f haproxy.cfg   (mode tcp, nbthread 1, maxconn 9900, splice-auto $( [ "$HAPROXY_SPLICE" = 1 ] && echo on || echo off))"
    [[ " $TARGETS " == *" pen "* ]] && cmd "$phase" "${p}pen -f -r -x 10000 -q 1024 -O tcp_nodelay $HOST:$P_PEN $HOST:BACKEND"
    [[ " $TARGETS " == *" nginx "* ]] && cmd "$phase" "${p}nginx -p DIR -c DIR/nginx.conf -e DIR/error.log   (own instance: $(nginx_stream_load 2>/dev/null) daemon off; master_process off; worker_processes 1; worker_rlimit_nofile 20000; events { worker_connections 20000; } stream { server { listen $HOST:$P_NGINXS; proxy_pass $HOST:BACKEND; tcp_nodelay on; } })"
    [[ " $TARGETS " == *" socat "* ]] && cmd "$phase" "${p}socat TCP-LISTEN:$P_SOCAT,bind=$HOST,reuseaddr,fork,backlog=1024 TCP:$HOST:BACKEND,nodelay"
    return 0
}

# syscalls_once PHASE NAME CPUSET CONNS [wrk args]: a short wrk run with the proxy under
# `strace -c -f`; records syscalls per request by name (strace slows the proxy, so only
# the counts mean anything, not the rates). Part of PROFILE=1.
syscalls_once() {
    local phase=$1 name=$2 cpus=$3 conns=$4; shift 4
    local pid=${T_PID[$name]} port=${T_PORT[$name]} st=$TMP/strace-$phase-$name.txt stpid reqs
    timeout 8 strace -c -f -p "$pid" -o "$st" >/dev/null 2>&1 &
    stpid=$!; track "$stpid"
    sleep 0.5
    reqs=$(taskset -c "${cpus:-$ALLCPUS}" wrk -t1 -c"$conns" -d3s "$@" "http://$HOST:$port/${WRK_FILE:-1k.bin}" 2>&1 | awk '/requests in/ { print $1 }')
    kill -INT "$stpid" 2>/dev/null; wait "$stpid" 2>/dev/null
    [ -s "$st" ] && [ "${reqs:-0}" -gt 0 ] || { note "phase $phase: strace -c of $name gave nothing"; return; }
    { echo "--- $name, phase $phase: syscalls per request under strace -c -f ($reqs requests)"
      awk -v r="$reqs" 'NR > 2 && $1 ~ /^[0-9.]+$/ && $NF != "total" { c = $4; printf "  %-16s %7.2f\n", $NF, c / r; t += c }
                        END { printf "  %-16s %7.2f\n", "(all)", t / r }' "$st" | sort -k2 -nr | head -n 16
    } >>"$TMP/profiles.txt"
}

save_profile() {  # save_profile PHASE NAME PERF_DATA: flat profile, top symbols
    [ -s "$3" ] || { note "phase $1: perf recorded nothing for $2"; return; }
    { echo "--- $2, phase $1: perf record -F 999 -g -p PID -- sleep $DURATION; perf report --no-children -g none --percent-limit 1"
      perf report -i "$3" --stdio --no-children -g none --percent-limit 1 --sort dso,sym 2>/dev/null \
          | grep -v '^#' | grep -v '^$' | head -n 40
    } >>"$TMP/profiles.txt"
    rm -f "$3"
}

# ---------------------------------------------------------------- phases (issue 2)
phase_a() {  # keepalive 1 KiB, -c50, pinned
    proxy_cmdline_notes "$PROXY_CPU" a
    wrk_phase a "$WRK_CONNS" 1
}
phase_b() {  # one connection, unpinned: latency added over direct
    proxy_cmdline_notes "" b
    wrk_phase b 1 0
}
phase_c() {  # new TCP connection per request
    proxy_cmdline_notes "$PROXY_CPU" c
    wrk_phase c "$WRK_CONNS" 1 -H "Connection: close"
}

phase_g() {  # keepalive 64 KiB responses (bulk over many connections), -c50, pinned
    proxy_cmdline_notes "$PROXY_CPU" g
    WRK_FILE=64k.bin WRK_BYTES=65536 wrk_phase g "$WRK_CONNS" 1
}

phase_d() {  # redis-benchmark -P 16
    have redis-server && have redis-benchmark || { note "phase d skipped: redis-server/redis-benchmark not installed"; return; }
    proxy_cmdline_notes "$PROXY_CPU" d
    start_redis || return
    start_targets "$P_REDIS" "$PROXY_CPU"
    cmd d "taskset -c $LOAD_CPU redis-benchmark -h $HOST -p PORT -P 16 -t get,set -n $REDIS_N -q"
    local r t
    for ((r = 0; r <= ROUNDS; r++)); do          # round 0 = warm-up, not recorded
        for t in "${RUNNING[@]}"; do
            [ "$t" = direct ] || [ -n "${T_PID[$t]:-}" ] || continue
            local pid=${T_PID[$t]:-} port=${T_PORT[$t]} out=$TMP/redis.out t0 t1 n0 n1 h0 h1 n=$REDIS_N
            [ "$r" = 0 ] && n=$((REDIS_N / 10))
            t0=$( [ -n "$pid" ] && cpu_ticks "$pid" || echo 0); n0=$( [ -n "$pid" ] && cpu_ns "$pid" || echo 0)
            h0=$(host_ticks)
            timeout 120 taskset -c "$LOAD_CPU" redis-benchmark -h "$HOST" -p "$port" -P 16 -t get,set -n "$n" -q 2>&1 \
                | tr '\r' '\n' >"$out"
            h1=$(host_ticks)
            t1=$( [ -n "$pid" ] && cpu_ticks "$pid" || echo 0); n1=$( [ -n "$pid" ] && cpu_ns "$pid" || echo 0)
            if [ "$r" = 0 ]; then alive "$t" warmup; continue; fi
            local set get
            set=$(awk '/^SET: .*requests per second/ { v = $2 } END { print v }' "$out")
            get=$(awk '/^GET: .*requests per second/ { v = $2 } END { print v }' "$out")
            if [ -z "$set" ] || [ -z "$get" ]; then
                note "phase d round $r: redis-benchmark against $t gave no result: $(grep -v '^$' "$out" | tail -3 | tr '\n' ' ')"
                alive "$t" "$r"; continue
            fi
            rec d "$t" "$r" set_ops "$set"
            rec d "$t" "$r" get_ops "$get"
            if [ -n "$pid" ]; then
                rec d "$t" "$r" cpu_us_per_op "$(calc "($t1 - $t0) / $CLK_TCK * 1e6 / (2 * $n)")"
                rec d "$t" "$r" cpu_us_per_op_sched "$(calc "($n1 - $n0) / 1000 / (2 * $n)")"
            fi
            rec d "$t" "$r" host_cpu_us_per_op "$(calc "($h1 - $h0) / $CLK_TCK * 1e6 / (2 * $n)")"
            log "  d r$r $t: SET $set/s GET $get/s cpu $(( t1 - t0 )) ticks"
            alive "$t" "$r"
            sleep 0.5
        done
    done
    stop_targets
    stop_backend
}

phase_e() {  # iperf3 forward and reverse
    have iperf3 || { note "phase e skipped: iperf3 not installed"; return; }
    proxy_cmdline_notes "$PROXY_CPU" e
    start_iperf_server || return
    start_targets "$P_IPERF" "$PROXY_CPU"
    cmd e "taskset -c $LOAD_CPU iperf3 -c $HOST -p PORT -t $IPERF_TIME -J      (forward: client -> server)"
    cmd e "taskset -c $LOAD_CPU iperf3 -c $HOST -p PORT -t $IPERF_TIME -J -R   (reverse: server -> client)"
    local r t dir
    for ((r = 1; r <= ROUNDS; r++)); do
        for t in "${RUNNING[@]}"; do
            for dir in fwd rev; do
                [ "$t" = direct ] || [ -n "${T_PID[$t]:-}" ] || continue
                iperf_once e "$t" "$r" "$dir" "$IPERF_TIME"
            done
        done
    done
    stop_targets
    stop_backend
}

# iperf_once PHASE NAME ROUND fwd|rev SECONDS [extra iperf3 args]
iperf_once() {
    local phase=$1 t=$2 r=$3 dir=$4 secs=$5; shift 5
    local pid=${T_PID[$t]:-} port=${T_PORT[$t]} out=$TMP/iperf.json t0 t1 n0 n1 h0 h1 rflag=""
    [ "$dir" = rev ] && rflag=-R
    t0=$( [ -n "$pid" ] && cpu_ticks "$pid" || echo 0); n0=$( [ -n "$pid" ] && cpu_ns "$pid" || echo 0)
    h0=$(host_ticks)
    # shellcheck disable=SC2086
    timeout $((secs + 30)) taskset -c "$LOAD_CPU" iperf3 -c "$HOST" -p "$port" -t "$secs" -J $rflag "$@" >"$out" 2>&1
    h1=$(host_ticks)
    t1=$( [ -n "$pid" ] && cpu_ticks "$pid" || echo 0); n1=$( [ -n "$pid" ] && cpu_ns "$pid" || echo 0)
    local res
    res=$(python3 - "$out" <<'PY'
import json, sys
try:
    j = json.load(open(sys.argv[1]))
    s = j["end"]["sum_received"]
    print(s["bits_per_second"] / 1e9, s["bytes"])
except Exception as e:
    err = ""
    try:
        err = json.load(open(sys.argv[1])).get("error", "")
    except Exception:
        err = open(sys.argv[1]).read()[-200:]
    print("ERR", repr(err or e).replace("\n", " "))
PY
)
    if [[ $res == ERR* ]]; then
        note "phase $phase round $r: iperf3 $dir against $t failed: ${res#ERR }"
        alive "$t" "$r"; sleep 1; return 1
    fi
    local gbps=${res% *} bytes=${res#* }
    if [ "${bytes%.*}" -le 0 ] 2>/dev/null; then
        note "phase $phase round $r: iperf3 $dir against $t moved no bytes"
        alive "$t" "$r"; sleep 1; return 1
    fi
    rec "$phase" "$t" "$r" "${dir}_gbps" "$gbps"
    if [ -n "$pid" ]; then
        rec "$phase" "$t" "$r" "${dir}_cpu_s_per_gb" "$(calc "($t1 - $t0) / $CLK_TCK / ($bytes / 1e9)")"
        rec "$phase" "$t" "$r" "${dir}_cpu_s_per_gb_sched" "$(calc "($n1 - $n0) / 1e9 / ($bytes / 1e9)")"
    fi
    rec "$phase" "$t" "$r" "${dir}_host_cpu_s_per_gb" "$(calc "($h1 - $h0) / $CLK_TCK / ($bytes / 1e9)")"
    log "  $phase r$r $t $dir: $(printf '%.2f' "$gbps") Gbit/s cpu $(( t1 - t0 )) ticks (host $(( h1 - h0 )))"
    alive "$t" "$r"
    sleep 0.5
}

phase_f() {  # RSS per idle established pair
    have python3 || { note "phase f skipped: python3 not found"; return; }
    proxy_cmdline_notes "$PROXY_CPU" f
    start_holder || return
    cmd f "taskset -c $LOAD_CPU python3 bench/idle_pairs.py server --port $P_HOLD   (accepts, answers 1 byte per byte, holds)"
    cmd f "taskset -c $LOAD_CPU python3 bench/idle_pairs.py client --port PORT -n $PAIRS   (1 byte each way per pair, then idle)"
    local t
    for t in $TARGETS; do
        [ "$t" = direct ] && continue            # nothing in between to measure
        [ "$t" = socat ] && { note "phase f: socat skipped (one process per connection)"; continue; }
        start_target "$t" "$P_HOLD" "$PROXY_CPU" || continue
        idle_once f "$t" 1 "$PAIRS"
        stop_target "$t"
    done
    stop_backend
}

idle_once() {  # idle_once PHASE NAME ROUND N
    local phase=$1 t=$2 r=$3 n=$4 pid=${T_PID[$2]} port=${T_PORT[$2]} before after out=$TMP/idle-$2.out cpid i est
    sleep 0.5
    before=$(rss_kib "$pid")
    # The client holds its pairs until its stdin closes: feed it from a fifo we own.
    local fifo=$TMP/idle.fifo
    rm -f "$fifo"; mkfifo "$fifo"
    taskset -c "$LOAD_CPU" python3 "$ROOT/bench/idle_pairs.py" client --port "$port" -n "$n" --hold 300 <"$fifo" >"$out" 2>"$out.err" &
    cpid=$!; track "$cpid"
    exec {hold_fd}>"$fifo"
    est=""
    for ((i = 0; i < 1200; i++)); do          # up to 120 s
        est=$(awk '/^established/ { print $2 }' "$out")
        [ -n "$est" ] && break
        kill -0 "$cpid" 2>/dev/null || break
        sleep 0.1
    done
    if [ -z "$est" ] || [ "$est" = 0 ]; then
        note "phase $phase: idle pairs through $t: none established ($(tail -2 "$out.err" | tr '\n' ' '))"
        exec {hold_fd}>&-; kill_pid "$cpid" 2; alive "$t" "$r"; return 1
    fi
    [ "$est" -lt "$n" ] && note "phase $phase: only $est of $n idle pairs established through $t: $(head -2 "$out.err" | tr '\n' ' ')"
    sleep 1                                    # let the proxy settle
    after=$(rss_kib "$pid")
    rec "$phase" "$t" "$r" pairs "$est"
    rec "$phase" "$t" "$r" rss_before_kib "$before"
    rec "$phase" "$t" "$r" rss_after_kib "$after"
    rec "$phase" "$t" "$r" rss_bytes_per_pair "$(calc "($after - $before) * 1024 / $est")"
    log "  $phase $t: $est pairs, RSS $before -> $after KiB = $(calc "($after - $before) * 1024 / $est") B/pair"
    exec {hold_fd}>&-                          # client closes its pairs and exits
    kill_pid "$cpid" 10
    rm -f "$fifo"
    sleep 1
    alive "$t" "$r"
}

# ---------------------------------------------------------------- hooks for later issues
# Opt-in through PHASES; each one checks that the proxy has the feature and
# skips with a message otherwise.

# Issue 3: 10 apps x 10 ports x 4 targets, keepalive 1 KiB load spread over all
# 100 ports vs the single-app case in the same run; target: CPU per request
# within 5% of single-app. wrk gives each thread one address (Lua setup()), so
# -t100 -c100 covers the 100 ports with one connection each; the single-app
# case runs the same -t100 -c100 against one port. Both pinned as in phase a.
phase_multiapp() {
    epoxy_has_flag "--config" || { note "phase multiapp skipped: epoxy has no --config yet (issue 3)"; return; }
    have wrk && have nginx || { note "phase multiapp skipped: wrk/nginx missing"; return; }
    local cfg=$TMP/multiapp.toml lua=$TMP/multiapp.lua a p r pid ports=()
    {
        echo "[defaults]"; echo "workers = 1"; echo
        for ((a = 0; a < 10; a++)); do
            local l=()
            for ((p = 0; p < 10; p++)); do l+=("\"$HOST:$((20000 + a * 10 + p))\""); ports+=($((20000 + a * 10 + p))); done
            echo "[[app]]"; echo "name = \"app$a\""
            echo "listen = [$(IFS=,; echo "${l[*]}")]"
            echo "targets = [\"$HOST:$P_NGINX\", \"$HOST:$((P_NGINX + 1))\", \"$HOST:$((P_NGINX + 2))\", \"$HOST:$((P_NGINX + 3))\"]"; echo
        done
    } >"$cfg"
    cat >"$lua" <<EOF
local ports = { $(IFS=,; echo "${ports[*]}") }
local n = 0
function setup(thread)
    n = n + 1
    thread.addr = wrk.lookup("$HOST", tostring(ports[(n - 1) % #ports + 1]))[1]
end
EOF
    start_nginx "$LOAD_CPU" $((P_NGINX + 1)) $((P_NGINX + 2)) $((P_NGINX + 3)) || return
    cmd multiapp "taskset -c $PROXY_CPU $EPOXY_BIN -c multiapp.toml   (10 apps x 10 ports 20000-20099 x 4 nginx targets $P_NGINX-$((P_NGINX + 3)))"
    cmd multiapp "taskset -c $LOAD_CPU wrk -t100 -c100 -d${DURATION}s --latency -s multiapp.lua http://$HOST:20000/1k.bin   (one port per thread)"
    cmd multiapp "single: taskset -c $PROXY_CPU $EPOXY_BIN -l $HOST -p $P_EPOXY -b $HOST -P $P_NGINX; taskset -c $LOAD_CPU wrk -t100 -c100 -d${DURATION}s --latency http://$HOST:$P_EPOXY/1k.bin"
    for ((r = 1; r <= ROUNDS; r++)); do
        if start_target epoxy "$P_NGINX" "$PROXY_CPU"; then
            T_PID[epoxy-single]=${T_PID[epoxy]}; T_PORT[epoxy-single]=${T_PORT[epoxy]}; T_LOG[epoxy-single]=${T_LOG[epoxy]}
            WRK_THREADS=100 wrk_once multiapp epoxy-single "$r" "$LOAD_CPU" 100 "$DURATION"
            T_PID[epoxy-single]=""; stop_target epoxy
        fi
        RUST_LOG=${RUST_LOG:-info} taskset -c "$PROXY_CPU" "$EPOXY_BIN" -c "$cfg" >"$LOGS/epoxy-multi.log" 2>&1 &
        pid=$!; track "$pid"
        if wait_port 20099 "$pid" 10; then
            T_PID[epoxy-multi]=$pid; T_PORT[epoxy-multi]=20000; T_LOG[epoxy-multi]=$LOGS/epoxy-multi.log
            WRK_THREADS=100 wrk_once multiapp epoxy-multi "$r" "$LOAD_CPU" 100 "$DURATION" -s "$lua"
            stop_target epoxy-multi
        else
            note "phase multiapp: epoxy -c multiapp.toml did not listen: $(tail -3 "$LOGS/epoxy-multi.log" | tr '\n' ' ')"
            kill_pid "$pid" 2
        fi
    done
    stop_backend
}

# Issue 4: keepalive 1 KiB with the admin endpoint on and scraped every second
# vs off; target: CPU per request differs by at most 3%.
phase_admin() {
    epoxy_has_flag "--admin" || { note "phase admin skipped: epoxy has no --admin yet (issue 4)"; return; }
    local saved=$TARGETS scraper=""
    TARGETS="epoxy epoxy-admin"
    cmd admin "epoxy vs epoxy --admin $HOST:$P_ADMIN with GET /metrics every second (python3 urllib) during each run"
    (   # scraper: runs for the whole phase, harmless while the endpoint is down
        while :; do
            python3 -c "import urllib.request as u; u.urlopen('http://$HOST:$P_ADMIN/metrics', timeout=1).read()" 2>/dev/null
            sleep 1
        done ) &
    scraper=$!; track "$scraper"
    wrk_phase admin "$WRK_CONNS" 1
    kill_pid "$scraper" 1
    TARGETS=$saved
}

# Issue 5: 1 vs 2 workers, keepalive and connection-per-request. On this
# 2-core machine the load generator shares CPU 1 with worker 2, so read the
# ratio with care; on a 16-core machine extend to 1 2 4 8 16 and pin load elsewhere.
phase_scaling() {
    epoxy_has_flag "--workers" || { note "phase scaling skipped: epoxy has no --workers (issue 5)"; return; }
    local saved=$TARGETS savedcpu=$PROXY_CPU
    TARGETS="epoxy-w1 epoxy-w2"
    PROXY_CPU="0-$(($(nproc) - 1))"
    cmd scaling "$EPOXY_BIN ... --workers 1|2, taskset -c $PROXY_CPU; keepalive and Connection: close as in a and c"
    wrk_phase scaling-ka "$WRK_CONNS" 1
    wrk_phase scaling-close "$WRK_CONNS" 1 -H "Connection: close"
    TARGETS=$saved; PROXY_CPU=$savedcpu
}

# Issue 5: iperf3 with 64 KiB writes, splice on/off for epoxy and HAProxy;
# target: throughput >= HAProxy's with splice at <= 0.6x its CPU per GB.
phase_splice() {
    epoxy_has_flag "--splice" || { note "phase splice skipped: epoxy has no --splice yet (issue 5)"; return; }
    have iperf3 || { note "phase splice skipped: iperf3 missing"; return; }
    local saved=$TARGETS r t dir
    TARGETS="epoxy epoxy-splice haproxy haproxy-splice direct"
    start_iperf_server || return
    start_targets "$P_IPERF" "$PROXY_CPU"
    cmd splice "taskset -c $LOAD_CPU iperf3 -c $HOST -p PORT -t $IPERF_TIME -l 64K -J [-R]"
    for ((r = 1; r <= ROUNDS; r++)); do
        for t in "${RUNNING[@]}"; do
            # haproxy and haproxy-splice share a port: run them one at a time
            for dir in fwd rev; do iperf_once splice "$t" "$r" "$dir" "$IPERF_TIME" -l 64K; done
        done
    done
    stop_targets
    stop_backend
    TARGETS=$saved
}

# Issue 9: the cost of the edge features on connection-per-request traffic (phase c's
# load). Chain: wrk -> front epoxy (CPU 1) -> middle epoxy (measured, CPU 0) -> nginx (CPU 1).
#   edge-plain: front plain, middle plain, nginx plain port.
#   edge-full:  front `send_proxy = "v2"`, middle `accept_proxy` + `send_proxy = "v2"` + a
#               1,000-entry allow list (the matching entry last), nginx `listen ... proxy_protocol`.
# Target: the middle's CPU per request with the features at most 5% above without.
edge_cfg() {  # edge_cfg FILE NAME LISTEN_PORT TARGET_PORT [extra lines...]
    local f=$1 name=$2 lp=$3 tp=$4; shift 4
    { echo '[defaults]'; echo 'log_interval = "off"'; echo '[[app]]'; echo "name = \"$name\""
      echo "listen = [\"$HOST:$lp\"]"; echo "targets = [\"$HOST:$tp\"]"
      local l; for l in "$@"; do echo "$l"; done; } >"$f"
}
phase_edge() {
    epoxy_has_flag "--config" || { note "phase edge skipped: epoxy has no --config"; return; }
    have wrk && have nginx || { note "phase edge skipped: wrk/nginx missing"; return; }
    local r v pf pm allow="" i fport
    for ((i = 0; i < 999; i++)); do allow="$allow\"10.$((i / 250)).$((i % 250)).0/24\", "; done
    allow="$allow\"127.0.0.0/8\""
    # front 18060/18062 -> middle 18061/18063 -> nginx 18081 (plain) / 18087 (proxy_protocol)
    edge_cfg "$TMP/edge-front-plain.toml" front 18060 18061
    edge_cfg "$TMP/edge-front-full.toml" front 18062 18063 'send_proxy = "v2"'
    edge_cfg "$TMP/edge-middle-plain.toml" middle 18061 "$P_NGINX"
    edge_cfg "$TMP/edge-middle-full.toml" middle 18063 18087 'accept_proxy = true' 'send_proxy = "v2"' "allow = [$allow]"
    NGINX_PP_PORT=18087 start_nginx "$LOAD_CPU" || return
    cmd edge "taskset -c $LOAD_CPU wrk -t1 -c$WRK_CONNS -d${DURATION}s --latency -H 'Connection: close' http://$HOST:FRONT/1k.bin"
    cmd edge "front: taskset -c $LOAD_CPU $EPOXY_BIN -c edge-front-{plain,full}.toml; measured middle: taskset -c $PROXY_CPU $EPOXY_BIN -c edge-middle-{plain,full}.toml"
    for ((r = 1; r <= ROUNDS; r++)); do
        for v in plain full; do
            fport=18060; [ "$v" = full ] && fport=18062
            RUST_LOG=warn taskset -c "$LOAD_CPU" "$EPOXY_BIN" -c "$TMP/edge-front-$v.toml" >"$LOGS/edge-front-$v.log" 2>&1 &
            pf=$!; track "$pf"
            RUST_LOG=warn taskset -c "$PROXY_CPU" "$EPOXY_BIN" -c "$TMP/edge-middle-$v.toml" >"$LOGS/edge-middle-$v.log" 2>&1 &
            pm=$!; track "$pm"
            if wait_port "$fport" "$pf" 10 && wait_port $((fport + 1)) "$pm" 10; then
                T_PID[edge-$v]=$pm; T_PORT[edge-$v]=$fport; T_LOG[edge-$v]=$LOGS/edge-middle-$v.log
                wrk_once edge "edge-$v" warmup "$LOAD_CPU" "$WRK_CONNS" "$WARMUP" -H "Connection: close"
                wrk_once edge "edge-$v" "$r" "$LOAD_CPU" "$WRK_CONNS" "$DURATION" -H "Connection: close"
            else
                note "phase edge: the $v chain did not start: $(tail -2 "$LOGS"/edge-*-"$v".log | tr '\n' ' ')"
            fi
            T_PID[edge-$v]=""
            kill_pid "$pm" 5; kill_pid "$pf" 5
        done
    done
    stop_backend
}

# ---------------------------------------------------------------- setup
START_S=$(date +%s)
log "results: $RESULTS_DIR   tmp: $TMP"
log "DURATION=$DURATION ROUNDS=$ROUNDS IPERF_TIME=$IPERF_TIME REDIS_N=$REDIS_N PAIRS=$PAIRS PHASES='$PHASES' TARGETS='$TARGETS'"

missing=""
for t in wrk haproxy nginx pen redis-server redis-benchmark iperf3 gnuplot; do have "$t" || missing="$missing $t"; done
[[ " $TARGETS " == *" nginx "* ]] && have nginx && ! nginx_stream_load >/dev/null && missing="$missing nginx-stream-module"
if [ -n "$missing" ] && [ "${NO_INSTALL:-0}" != 1 ]; then
    log "missing:$missing — running scripts/install-bench-deps.sh"
    timeout 600 bash "$ROOT/scripts/install-bench-deps.sh" >&2 || log "install-bench-deps.sh failed; phases needing missing tools will be skipped"
fi

# Build and smoke-test epoxy (unless a stand-in is the subject).
if [[ " $TARGETS " == *" epoxy"* ]]; then
    if [ "${NO_BUILD:-0}" != 1 ]; then
        log "cargo build --release"
        if ! cargo build --release >"$LOGS/build.log" 2>&1; then
            note "cargo build --release failed (epoxy phases skipped): $(grep -m3 -E '^error' "$LOGS/build.log" | tr '\n' ' ')"
        fi
    fi
    if [ -x "$EPOXY_BIN" ]; then
        epoxy_ok=1
        meta "epoxy.version" "$("$EPOXY_BIN" -V 2>&1 | head -1) (git $SHORT, binary built $(date -u -r "$EPOXY_BIN" +%FT%TZ))"
    else
        note "no epoxy binary at $EPOXY_BIN: epoxy skipped"
    fi
fi

ulimit -n "$(ulimit -Hn)" 2>/dev/null    # children (wrk, python) inherit the raised soft limit

meta "date" "$(date -u +%FT%TZ)"
meta "host.nproc" "$(nproc)"
meta "host.cpu" "$(lscpu | awk -F: '/Model name/ { gsub(/^ +/, "", $2); print $2; exit }')"
meta "host.kernel" "$(uname -srm)"
meta "host.os" "$(. /etc/os-release 2>/dev/null; echo "${PRETTY_NAME:-unknown}")"
meta "host.mem" "$(free -m | awk '/^Mem:/ { print $2 " MiB" }')"
meta "host.nofile" "soft $(ulimit -Sn) / hard $(ulimit -Hn)"
meta "host.loadavg.start" "$(cut -d' ' -f1-3 /proc/loadavg)"
meta "host.busiest.start" "$(ps -eo pcpu=,comm= --sort=-pcpu | head -4 | awk '{ printf "%s%s %s%%", (NR > 1 ? ", " : ""), $2, $1 }')"
meta "haproxy" "$(haproxy -v 2>/dev/null | head -1)"
meta "pen" "$(dpkg-query -W -f='pen ${Version}' pen 2>/dev/null || echo "pen (version unknown)")"
meta "nginx.stream" "$(nginx -v 2>&1 | sed 's/.*version: //'), stream module: $(l=$(nginx_stream_load 2>/dev/null) && echo "${l:-built in}" || echo missing)"
meta "wrk" "$(wrk -v 2>&1 | head -1)"
meta "redis" "$(redis-server --version 2>/dev/null)"
meta "iperf3" "$(iperf3 --version 2>/dev/null | head -1)"
meta "settings" "DURATION=$DURATION ROUNDS=$ROUNDS WARMUP=$WARMUP IPERF_TIME=$IPERF_TIME REDIS_N=$REDIS_N PAIRS=$PAIRS WRK_CONNS=$WRK_CONNS PROXY_CPU=$PROXY_CPU LOAD_CPU=$LOAD_CPU HAPROXY_SPLICE=$HAPROXY_SPLICE PROFILE=${PROFILE:-0} EPOXY_ARGS='$EPOXY_ARGS'"
meta "subject" "$SUBJECT"
meta "targets" "$TARGETS"
meta "phases" "$PHASES"

# ---------------------------------------------------------------- run
CURRENT_PHASE=""
for ph in $PHASES; do
    CURRENT_PHASE=$ph
    fn=phase_$ph
    if ! declare -F "$fn" >/dev/null; then note "unknown phase '$ph'"; continue; fi
    meta "loadavg.before.$ph" "$(cut -d' ' -f1-3 /proc/loadavg)"
    log "phase $ph"
    ps_start=$(date +%s)
    "$fn"
    meta "phase.$ph.seconds" "$(( $(date +%s) - ps_start ))"
done
meta "host.loadavg.end" "$(cut -d' ' -f1-3 /proc/loadavg)"
meta "runtime.seconds" "$(( $(date +%s) - START_S ))"

# ---------------------------------------------------------------- report
out_base=""
if [ "${NO_RESULTS:-0}" != 1 ]; then
    mkdir -p "$RESULTS_DIR"
    out_base=$RESULTS_DIR/$(date -u +%Y-%m-%d-%H%M)-$SHORT
    [ "$SUBJECT" = epoxy ] || out_base=$out_base-$SUBJECT
fi
python3 "$ROOT/bench/report.py" --raw "$RAW" --meta "$META" --commands "$CMDS" --notes "$NOTES" \
    --epoxy-logs "$TMP/epoxy-logs.txt" --profiles "$TMP/profiles.txt" --subject "$SUBJECT" ${out_base:+--out "$out_base"} \
    ${out_base:+--chart "$RESULTS_DIR/chart.svg"}
log "done in $(( $(date +%s) - START_S ))s"
