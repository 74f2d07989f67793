#!/usr/bin/env bash
# Install PostgreSQL 15 and PostGIS 3 with apt when they are missing; do nothing otherwise.
# Also libgomp1, the OpenMP runtime LightGBM's wheel (s2cloudless's cloud detector) links.
set -euo pipefail

PG_MAJOR="${REVISIT_PG_MAJOR:-15}"
control="/usr/share/postgresql/${PG_MAJOR}/extension/postgis.control"
initdb="/usr/lib/postgresql/${PG_MAJOR}/bin/initdb"

has_gomp() { ldconfig -p 2>/dev/null | grep -q 'libgomp\.so\.1'; }

if [[ -f "$control" && -x "$initdb" ]] && has_gomp; then
    exit 0
fi

# shellcheck source=apt-install.sh
source "$(dirname "$0")/apt-install.sh"
apt_install PostGIS "postgresql-${PG_MAJOR}" "postgresql-${PG_MAJOR}-postgis-3" libgomp1
test -f "$control" || { echo "revisit: PostGIS still missing after apt-get ($control)" >&2; exit 1; }
