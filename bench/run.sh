#!/usr/bin/env bash
# The one-command benchmark: install what it needs, then run `python -m bench` (see BENCHMARKS.md).
#   bash bench/run.sh            # full run (~10 min), rewrites BENCHMARKS.md
#   bash bench/run.sh --quick    # ~2-3 min
# Debian packages: wrk, nginx-light, redis-server (apt-get, as root or with sudo); PyPI: py-spy
# into .venv; the gateway itself: `pip install -e .` into .venv when .venv is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

missing=()
command -v wrk >/dev/null 2>&1 || missing+=(wrk)
command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ] || missing+=(nginx-light)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v taskset >/dev/null 2>&1 || missing+=(util-linux)
if [ "${#missing[@]}" -gt 0 ]; then
  echo "bench: installing ${missing[*]} with apt-get" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
  # nginx-light's package starts a system nginx on port 80 where an init system exists; the
  # benchmark runs its own nginx on a free port and leaves that one alone.
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
  .venv/bin/python -m pip install -q -e .
fi
[ -x .venv/bin/py-spy ] || .venv/bin/python -m pip install -q py-spy

export BENCH_COMMAND="bash bench/run.sh${*:+ $*}"
exec .venv/bin/python -m bench "$@"
