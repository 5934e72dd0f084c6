#!/usr/bin/env bash
# System packages the test suite needs, from Debian: prometheus (with promtool) for the
# monitoring tests, chromium for the Playwright web test. Idempotent: installs only what is
# missing, and runs apt-get update only when something is.
set -euo pipefail

need=()
command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v chromium >/dev/null 2>&1 || need+=(chromium)

if [ ${#need[@]} -eq 0 ]; then
    echo "system deps present: prometheus, promtool, chromium"
    exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
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
