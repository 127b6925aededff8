#!/usr/bin/env bash
# `make bench`: the gateway benchmark (bench/harness.py), then the pipeline benchmark when
# bench/pipeline.py exists. Installs wrk and nginx from Debian when run as root and missing.
# Durations: BENCH_DURATION=5s for a quick run; see bench/README.md for every knob.
# BENCH_DASHBOARD=1 adds the dashboard benchmarks (API time per page, rendered page load).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
if [[ ! -x $PYTHON ]]; then
    echo "bench: $PYTHON not found; run 'make bootstrap-dev' first" >&2
    exit 2
fi

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] || missing+=(nginx)
command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
if (( ${#missing[@]} )); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "bench: installing ${missing[*]} (Debian packages)"
        # policy-rc.d in containers keeps the packaged nginx service from starting; the
        # benchmark only ever runs its own nginx processes in the foreground.
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    else
        echo "bench: missing ${missing[*]}; install them (apt-get install ${missing[*]})" >&2
        exit 2
    fi
fi
export PATH="$PATH:/usr/sbin"

# The harness stops every process it started by its own pid (try/finally, SIGINT/SIGTERM);
# this trap forwards an interrupt of run.sh to it.
child=0
forward() {
    if (( child )); then
        kill -TERM "$child" 2>/dev/null || true
        wait "$child" 2>/dev/null || true
    fi
    exit 130
}
trap forward INT TERM HUP

"$PYTHON" bench/harness.py &
child=$!
status=0
wait "$child" || status=$?
child=0
if (( status != 0 )); then
    exit "$status"
fi

if [[ -f bench/pipeline.py && ${BENCH_PIPELINE:-1} != 0 ]]; then
    echo
    echo "bench: pipeline benchmark (bench/pipeline.py)"
    "$PYTHON" bench/pipeline.py &
    child=$!
    wait "$child" || status=$?
    child=0
fi

# Opt-in (BENCH_DASHBOARD=1, ~9 more minutes): the dashboard's API time per page, then its
# rendered page load in headless Chromium, both on 10 M events (bench/README.md).
if [[ ${BENCH_DASHBOARD:-0} != 0 ]]; then
    for script in bench/dashboard_queries.py bench/dashboard_pageload.py; do
        echo
        echo "bench: $script"
        "$PYTHON" "$script" &
        child=$!
        wait "$child" || status=$?
        child=0
    done
fi
exit "$status"
