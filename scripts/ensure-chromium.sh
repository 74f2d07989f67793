#!/usr/bin/env bash
# Install Debian's chromium with apt when it is missing; do nothing otherwise.
# tests/web/test_browser.py drives it headless to check the web map (it skips without it).
set -euo pipefail

browser="${REVISIT_CHROMIUM:-/usr/bin/chromium}"

if [[ -x "$browser" ]]; then
    exit 0
fi

packages=("chromium" "fonts-dejavu-core")
echo "revisit: installing ${packages[*]} with apt-get (for the web map's browser test)" >&2
if [[ "$(id -u)" -eq 0 ]]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    echo "revisit: chromium is missing and this user cannot install it:" \
         "run as root: apt-get install -y ${packages[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
test -x "$browser" || { echo "revisit: chromium still missing after apt-get ($browser)" >&2; exit 1; }
