#!/usr/bin/env bash
# Installs what the tests need (scripts/setup.sh without the main job), lints, runs the tests.
set -euo pipefail
cd "$(dirname "$0")/.."
CI=true bash scripts/setup.sh
.venv/bin/ruff check src tests bench
exec .venv/bin/python -m pytest "$@"
