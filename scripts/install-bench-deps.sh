#!/usr/bin/env bash
# Install the tools `make bench` (bench/run.sh) uses, on Debian/Ubuntu.
# Idempotent: packages already installed are skipped, and `apt-get update`
# runs at most once per invocation (and only when something is missing).
#
#   wrk            HTTP load generator            (phases a, b, c)
#   haproxy        peer proxy, mode tcp           (all phases)
#   pen            peer proxy, single process     (all phases)
#   nginx-light    1 KiB keepalive HTTP backend   (phases a, b, c)
#   libnginx-mod-stream  nginx's stream module, for the `nginx` peer proxy (all phases);
#                  only when the installed nginx has it neither built in nor as a module file
#   redis-server   redis backend                  (phase d)
#   redis-tools    redis-benchmark                (phase d)
#   iperf3         bulk throughput                (phase e)
#   gnuplot-nox    chart.svg
#   socat          optional stand-in proxy for developing the harness
#   linux-perf     optional, for profiles
set -euo pipefail

REQUIRED=(wrk haproxy pen redis-server redis-tools iperf3 gnuplot-nox)
OPTIONAL=(socat linux-perf python3)

if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null 2>&1; then SUDO=sudo; else
        echo "install-bench-deps: need root (or sudo) to install packages" >&2; exit 1
    fi
else
    SUDO=
fi

installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }

# nginx: any flavour will do (nginx-light on bookworm, plain nginx elsewhere).
nginx_pkg=""
if ! command -v nginx >/dev/null 2>&1 && ! installed nginx-light && ! installed nginx; then
    nginx_pkg=nginx-light
fi

missing=()
for p in "${REQUIRED[@]}"; do installed "$p" || missing+=("$p"); done
[ -n "$nginx_pkg" ] && missing+=("$nginx_pkg")

updated=0
apt_update() {
    if [ "$updated" -eq 0 ]; then
        $SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -qq
        updated=1
    fi
}

if [ "${#missing[@]}" -gt 0 ]; then
    echo "install-bench-deps: installing ${missing[*]}"
    apt_update
    # nginx-light does not exist on every release: fall back to nginx.
    if [ -n "$nginx_pkg" ] && ! apt-cache show nginx-light >/dev/null 2>&1; then
        missing=("${missing[@]/nginx-light/nginx}")
    fi
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
    echo "install-bench-deps: required tools already installed"
fi

# nginx's stream module (the `nginx` peer proxy). Debian builds nginx with
# --with-stream=dynamic and ships the module in libnginx-mod-stream; nginx-light
# does not pull it in.
stream_ok() {
    local v mp
    v=$(nginx -V 2>&1) || return 1
    grep -qE -- '--with-stream( |$)' <<<"$v" && return 0
    grep -qE -- '--with-stream=dynamic( |$)' <<<"$v" || return 1
    mp=$(grep -oE -- '--modules-path=[^ ]+' <<<"$v" | cut -d= -f2)
    [ -f "${mp:-/usr/lib/nginx/modules}/ngx_stream_module.so" ] || [ -f /usr/lib/nginx/modules/ngx_stream_module.so ]
}
if command -v nginx >/dev/null 2>&1 && ! stream_ok; then
    echo "install-bench-deps: installing libnginx-mod-stream (nginx stream module)"
    apt_update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libnginx-mod-stream \
        || echo "install-bench-deps: libnginx-mod-stream not installed: the nginx peer will be skipped" >&2
fi

# Optional tools: best effort, never fatal.
for p in "${OPTIONAL[@]}"; do
    installed "$p" && continue
    case "$p" in python3) command -v python3 >/dev/null 2>&1 && continue ;; esac
    apt_update
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$p" \
        || echo "install-bench-deps: optional package $p not installed (continuing)" >&2
done

# The packaged services must not keep running on their default ports; the
# benchmark starts its own instances with private configs.
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    for s in nginx haproxy redis-server; do $SUDO systemctl stop "$s" >/dev/null 2>&1 || true; done
fi

for t in wrk haproxy pen nginx redis-server redis-benchmark iperf3 gnuplot socat perf; do
    printf '  %-16s %s\n' "$t" "$(command -v "$t" || echo MISSING)"
done
printf '  %-16s %s\n' "nginx stream" "$(stream_ok && echo yes || echo MISSING)"
