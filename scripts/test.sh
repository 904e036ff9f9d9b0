#!/usr/bin/env bash
# THE test command: sets everything up, then runs pytest in the project venv.
#
#   bash scripts/test.sh                 # whole suite, including the real Label Studio tests
#   bash scripts/test.sh -m 'not e2e'    # arguments go to pytest unchanged
#
# Exits with pytest's status; "no tests collected" (pytest's 5) is a failure too.
set -euo pipefail

# shellcheck source=scripts/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO_ROOT"

bash scripts/setup.sh --with-chromium >/dev/null   # progress to stderr; VENV/LS_VENV from env.sh; chromium: report page test
export LS_VENV CLIP_LS_CACHE       # the end-to-end tests start Label Studio from $LS_VENV

if (( $# == 0 )); then set -- -q; fi
rc=0
"$VENV/bin/python" -m pytest "$@" || rc=$?
if (( rc == 5 )); then
    echo "test.sh: pytest collected no tests: failing" >&2
fi
exit "$rc"
