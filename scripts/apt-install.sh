# Sourced by the ensure-*.sh scripts: apt_install WHAT PACKAGE... installs the packages
# with apt-get, as root or through sudo, or explains how when this user cannot.
apt_install() {
    local what="$1"
    shift
    local sudo=()
    echo "revisit: installing $* with apt-get ($what)" >&2
    if [[ "$(id -u)" -ne 0 ]]; then
        if ! command -v sudo >/dev/null 2>&1; then
            echo "revisit: $what is missing and this user cannot install it:" \
                 "run as root: apt-get install -y $*" >&2
            exit 1
        fi
        sudo=(sudo)
    fi
    export DEBIAN_FRONTEND=noninteractive
    "${sudo[@]}" apt-get update -qq
    "${sudo[@]}" apt-get install -y -qq --no-install-recommends "$@" >/dev/null
}
