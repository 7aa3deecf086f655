# Shared by scripts/blockd and scripts/test: create or refresh the project's
# virtualenv only when pyproject.toml changed, so daily use costs nothing.
# shellcheck shell=bash

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
VENV="$ROOT/.venv"

_as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo "$@"; else
        echo "blockd: need root (or sudo) to run: $*" >&2; return 1; fi
}

apt_install() {
    # apt_install PKG... : install the Debian packages that are missing.
    local missing=()
    for p in "$@"; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "ok installed" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    command -v apt-get >/dev/null || { echo "blockd: missing packages: ${missing[*]}" >&2; return 1; }
    echo "blockd: installing Debian packages: ${missing[*]}" >&2
    _as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    _as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >&2
}

ensure_venv() {
    # ensure_venv EXTRAS : EXTRAS is "" or "[test]".
    local extras="$1" py="${PYTHON:-python3}"
    local stamp="$VENV/.blockd-stamp"
    local want
    want="$(cat "$ROOT/pyproject.toml" | sha256sum | cut -c1-16)$extras"
    if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && grep -qxF "$want" "$stamp"; then
        return 0
    fi
    if ! [ -x "$VENV/bin/python" ]; then
        if ! "$py" -m venv "$VENV" >/dev/null 2>&1; then
            rm -rf "$VENV"
            apt_install python3-venv python3-pip
            "$py" -m venv "$VENV"
        fi
    fi
    echo "blockd: installing the project into $VENV" >&2
    "$VENV/bin/python" -m pip install -q --disable-pip-version-check -e "$ROOT$extras" >&2
    # Keep a test-enabled stamp valid for plain runs too.
    # (An if, not `[ ] && ...`: under set -e a false test as the group's last command would
    # end the calling script with status 1 on the very first run.)
    {
        echo "$want"
        if [ -n "$extras" ]; then echo "${want%"$extras"}"; fi
    } > "$stamp"
}
