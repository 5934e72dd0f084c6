#!/usr/bin/env bash
# System packages the test suite needs, from Debian: prometheus (with promtool) for the
# monitoring tests, chromium for the Playwright web test. Idempotent: installs only what is
# missing, and runs apt-get update only when something is.
#
# Without apt-get (or without root or sudo) it names what is missing in one line and exits 1:
# those tests fail rather than skip without the programs, so `make test` stops here instead
# of failing them after the rest of the suite has run. Installed any other way (dnf, pacman,
# by hand), they are found on PATH and the script exits 0.
set -euo pipefail

need=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)

if [ ${#need[@]} -eq 0 ]; then
    echo "system deps present: prometheus, promtool, chromium"
    exit 0
fi

missing="missing ${need[*]} (prometheus + promtool for the monitoring tests, chromium at /usr/bin/chromium for the web test)"
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-system-deps: $missing; no apt-get here: install them with this system's package manager, then rerun" >&2
    exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if ! command -v sudo >/dev/null 2>&1; then
        echo "install-system-deps: $missing; not root and no sudo: run as root: apt-get install -y ${need[*]}" >&2
        exit 1
    fi
    SUDO="sudo"
fi
export DEBIAN_FRONTEND=noninteractive
echo "installing with apt-get: ${need[*]}"
$SUDO apt-get update -qq
# --no-install-recommends: prometheus would otherwise pull in node-exporter and friends
$SUDO apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
# the Debian package starts a prometheus service where systemd runs; the tests start their own
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
    $SUDO systemctl disable --now prometheus >/dev/null 2>&1 || true
fi
promtool --version | head -1
chromium --version
