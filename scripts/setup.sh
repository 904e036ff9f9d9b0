#!/usr/bin/env bash
# Idempotent setup of everything the project needs, on a machine that has only Python 3.11 + pip.
#
#   bash scripts/setup.sh [--project-only] [--no-ls] [--no-redis] [--with-chromium]
#
#   (1) project venv  $VENV     pip install -r requirements-test.txt (includes requirements.txt)
#   (2) Label Studio  $LS_VENV  pip install label-studio==$LS_VERSION, a venv of its own; and one venv
#                               per older release in $LS_RELEASES ($CLIP_LS_CACHE/ls-<release>)
#   (3) redis-server            apt-get, only when the binary is missing
#   (4) chromium                apt-get, only with --with-chromium or CLIP_LS_CHROMIUM=1 (screenshots)
#
# --project-only = --no-ls --no-redis (what scripts/serve.sh uses).
# A venv counts as installed only once its stamp file exists, and the stamp is written after pip
# succeeded; a venv without a stamp (a killed install) is deleted and built again.
# Concurrent runs (two test runs at once) serialise on a lock file in $CLIP_LS_CACHE.
# The last lines on stdout are `VENV=...` and `LS_VENV=...`; all progress goes to stderr.
set -euo pipefail

# shellcheck source=scripts/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"

want_ls=1
want_redis=1
want_chromium="${CLIP_LS_CHROMIUM:-0}"
for arg in "$@"; do
    case "$arg" in
        --project-only) want_ls=0; want_redis=0 ;;
        --no-ls) want_ls=0 ;;
        --no-redis) want_redis=0 ;;
        --with-chromium) want_chromium=1 ;;
        -h|--help) sed -n '2,15p' "${BASH_SOURCE[0]}"; exit 0 ;;
        *) echo "setup.sh: unknown option: $arg" >&2; exit 2 ;;
    esac
done

log() { echo "[setup] $*" >&2; }

# The interpreter new venvs are made from: $PYTHON, else python3.11, else python3.
PYTHON="${PYTHON:-$(command -v python3.11 || command -v python3)}"
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 11))'; then
    log "warning: $PYTHON is Python $("$PYTHON" -c 'import platform; print(platform.python_version())'), the project is tested with 3.11"
fi

# Quieter pip logs in CI; never prompt.
PIP_FLAGS=(--no-input)
if [[ "${CI:-}" == "true" ]]; then PIP_FLAGS+=(--progress-bar off); fi

mkdir -p "$CLIP_LS_CACHE"
exec 9>"$CLIP_LS_CACHE/.setup.lock"
flock 9   # released when this script exits

# make_venv DIR STAMP_CONTENT PIP_ARGS...: (re)build DIR unless its stamp matches.
make_venv() {
    local dir="$1" stamp_content="$2"; shift 2
    local stamp="$dir/.clip-ls-complete"
    if [[ -f "$stamp" && "$(cat "$stamp")" == "$stamp_content" ]]; then
        log "ok: $dir"
        return 0
    fi
    if [[ -e "$dir" ]]; then
        log "incomplete or stale venv, rebuilding: $dir"
        rm -rf "$dir"
    fi
    local t0=$SECONDS
    log "creating $dir"
    "$PYTHON" -m venv "$dir"
    "$dir/bin/python" -m pip install "${PIP_FLAGS[@]}" --upgrade pip >&2 \
        || log "warning: could not upgrade pip, going on with $("$dir/bin/python" -m pip --version)"
    "$dir/bin/python" -m pip install "${PIP_FLAGS[@]}" "$@" >&2
    echo "$stamp_content" > "$stamp"
    log "installed $dir in $((SECONDS - t0)) s"
}

# apt_install PACKAGE...: install Debian packages non-interactively (root, or sudo when available).
apt_install() {
    local sudo=()
    if [[ "$(id -u)" != 0 ]]; then
        if command -v sudo >/dev/null; then sudo=(sudo -n); else
            log "error: need root (or sudo) to apt-get install $*"; return 1
        fi
    fi
    log "apt-get install $*"
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

# (1) project venv
make_venv "$VENV" "$REQ_HASH" -r "$REPO_ROOT/requirements-test.txt"

# (2) Label Studio venv
if (( want_ls )); then
    make_venv "$LS_VENV" "label-studio==$LS_VERSION" "label-studio==$LS_VERSION"
    for release in $LS_RELEASES; do
        make_venv "$CLIP_LS_CACHE/ls-$release" "label-studio==$release" "label-studio==$release"
    done
fi

# (3) redis-server
if (( want_redis )); then
    if command -v redis-server >/dev/null; then
        log "ok: $(command -v redis-server)"
    else
        apt_install redis-server
    fi
fi

# (4) chromium, only on request
if [[ "$want_chromium" == 1 ]]; then
    if command -v chromium >/dev/null; then
        log "ok: $(command -v chromium)"
    else
        apt_install chromium
    fi
fi

echo "VENV=$VENV"
if (( want_ls )); then echo "LS_VENV=$LS_VENV"; fi
