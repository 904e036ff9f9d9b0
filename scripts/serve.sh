#!/usr/bin/env bash
# Sets up the project venv (not Label Studio) and starts the backend:
#
#   bash scripts/serve.sh [serve options...]     # e.g. --demo, see `python -m backend serve --help`
set -euo pipefail

# shellcheck source=scripts/env.sh
source "$(dirname "${BASH_SOURCE[0]}")/env.sh"
cd "$REPO_ROOT"

bash scripts/setup.sh --project-only >/dev/null
exec "$VENV/bin/python" -m backend serve "$@"
