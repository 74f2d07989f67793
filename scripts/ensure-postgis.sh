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

packages=("postgresql-${PG_MAJOR}" "postgresql-${PG_MAJOR}-postgis-3" "libgomp1")
echo "revisit: installing ${packages[*]} with apt-get" >&2
if [[ "$(id -u)" -eq 0 ]]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1; then
    sudo=(sudo)
else
    echo "revisit: PostGIS is missing and this user cannot install it:" \
         "run as root: apt-get install -y ${packages[*]}" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
"${sudo[@]}" apt-get update -qq
"${sudo[@]}" apt-get install -y -qq --no-install-recommends "${packages[@]}" >/dev/null
test -f "$control" || { echo "revisit: PostGIS still missing after apt-get ($control)" >&2; exit 1; }
