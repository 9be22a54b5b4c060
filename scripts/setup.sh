#!/usr/bin/env bash
# Sets up a development machine: a virtualenv in .venv with torch 2.13.0 (CPU build) and
# splice installed editable with its dev tools. With --servers, also installs the Debian
# servers that the test suites start (etcd-server, prometheus). Safe to run repeatedly.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}

if [[ "${1:-}" == "--servers" ]]; then
  need=()
  command -v etcd >/dev/null || need+=(etcd-server)
  command -v prometheus >/dev/null || need+=(prometheus)
  if (( ${#need[@]} )); then
    SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO=sudo
    echo "setup: installing ${need[*]} with apt-get"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # The packages start system services we do not want; tests start their own servers.
    for svc in etcd prometheus; do $SUDO systemctl disable --now "$svc" >/dev/null 2>&1 || true; done
    pkill -x etcd 2>/dev/null || true; pkill -x prometheus 2>/dev/null || true
  fi
  exit 0
fi

stamp="$VENV/.splice-setup"
if [[ -f "$stamp" && "$stamp" -nt pyproject.toml ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || python3 -m venv "$VENV"
pip() { "$VENV/bin/python" -m pip -q --disable-pip-version-check "$@" 2> >(grep -v '^WARNING: Location' >&2); }
echo "setup: installing torch==2.13.0 (CPU) and splice into $VENV"
pip install "torch==2.13.0"
pip install -e ".[dev]"
touch "$stamp"
