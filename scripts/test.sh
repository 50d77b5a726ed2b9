#!/usr/bin/env bash
# Set up and run the whole test suite: a venv in .venv, the package with its test extra,
# redis-server, redis-cli and prometheus (installed with apt-get when missing), then pytest. Extra arguments go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

# What the tests run as real processes, from Debian's packages when missing: redis-server and
# redis-cli (the Cluster tests), prometheus (the real scrape test).
missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
command -v redis-cli >/dev/null 2>&1 || missing+=(redis-tools)
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing Debian's ${missing[*]} (the tests start their own servers)" >&2
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e '.[test]'
exec .venv/bin/python -m pytest "$@"
