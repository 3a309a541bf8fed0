#!/usr/bin/env bash
# Tools the test suite drives for real, beyond Python packages: installed when missing.
set -euo pipefail
need_apt=()
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
command -v npm >/dev/null 2>&1 || need_apt+=(nodejs npm)
if ((${#need_apt[@]})); then
  if [ "$(id -u)" = 0 ]; then
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
  else
    echo "warning: ${need_apt[*]} missing and not root; tests that need them will skip" >&2
  fi
fi
