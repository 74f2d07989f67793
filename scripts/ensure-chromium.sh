#!/usr/bin/env bash
# Install Debian's chromium with apt when it is missing; do nothing otherwise.
# tests/web/test_browser.py drives it headless to check the web map (it skips without it).
set -euo pipefail

browser="${REVISIT_CHROMIUM:-/usr/bin/chromium}"

if [[ -x "$browser" ]]; then
    exit 0
fi

# shellcheck source=apt-install.sh
source "$(dirname "$0")/apt-install.sh"
apt_install Chromium chromium fonts-dejavu-core  # for the web map's browser test
test -x "$browser" || { echo "revisit: chromium still missing after apt-get ($browser)" >&2; exit 1; }
