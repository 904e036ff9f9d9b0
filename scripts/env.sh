# shellcheck shell=bash
# Computes (and exports) the paths every other script uses. Source it, don't run it:
#
#   source scripts/env.sh && echo "$VENV $LS_VENV"
#
# Nothing here installs anything; scripts/setup.sh does that.
#   CLIP_LS_CACHE  where venvs and the Label Studio template live (default ~/.cache/clip-ls)
#   VENV           project venv, keyed by a hash of requirements.txt + requirements-test.txt,
#                  so changing a pin gives a new, clean venv (old ones can be deleted by hand)
#   LS_VENV        Label Studio's own venv (its Django/redis/rq pins clash with ours); may be
#                  overridden from the environment
#   LS_VERSION     the Label Studio release the end-to-end tests run against
#   LS_RELEASES    older releases an e2e subset also runs against (tests/e2e/test_releases.py), each in
#                  its own venv $CLIP_LS_CACHE/ls-<release>; empty = none

REPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CLIP_LS_CACHE="${CLIP_LS_CACHE:-$HOME/.cache/clip-ls}"
LS_VERSION="1.23.2"
LS_RELEASES="${LS_RELEASES-1.16.0 1.20.0}"   # one before personal access tokens, one PAT-era

REQ_HASH="$(cat "$REPO_ROOT/requirements.txt" "$REPO_ROOT/requirements-test.txt" | sha256sum | cut -c1-12)"
VENV="$CLIP_LS_CACHE/venv-$REQ_HASH"
LS_VENV="${LS_VENV:-$CLIP_LS_CACHE/ls-$LS_VERSION}"

export REPO_ROOT CLIP_LS_CACHE LS_VERSION LS_RELEASES REQ_HASH VENV LS_VENV
