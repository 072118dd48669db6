#!/usr/bin/env bash
# One entry point that sets everything up on a fresh machine, then runs a job:
#   bash run.sh demo [args]      the main job (also with no job named): end-to-end agent distillation
#   bash run.sh compare [args]   every backend against the float64 reference
#   bash run.sh test [args]      the test suite
#   bash run.sh <cmd> [args]     any distillkit subcommand (env, kernels, bench, ...)
# Creates ./.venv (or uses $DISTILLKIT_VENV), installs torch, the package and its
# extension, and re-installs only when pyproject.toml, setup.py or csrc/ change.
set -euo pipefail
cd "$(dirname "$0")"

VENV=${DISTILLKIT_VENV:-.venv}
PYTHON=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ]; then
    echo "[run.sh] creating virtual environment $VENV" >&2
    "$PYTHON" -m venv "$VENV"
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"

stamp="$VENV/.distillkit-installed"
digest=$(cat pyproject.toml setup.py $(find csrc -type f 2>/dev/null | sort) 2>/dev/null | sha256sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$digest" ]; then
    echo "[run.sh] installing torch, triton and distillkit (first run: a few minutes)" >&2
    # pip resolves a CUDA build of torch on Linux: about 6 GB in the venv. Say so up front
    # rather than leave the user with pip's "No space left on device" halfway through.
    free_mb=$(df -Pm "$VENV" | awk 'NR == 2 {print $4}')
    if ! python -c "import torch" 2>/dev/null && [ "${free_mb:-0}" -lt 7000 ]; then
        echo "[run.sh] warning: ${free_mb} MB free where $VENV lives; torch with its CUDA" \
             "libraries needs about 6,000 MB (set DISTILLKIT_VENV to a roomier place)" >&2
    fi
    python -m pip install --quiet --upgrade pip
    # The extension builds against the installed torch, so torch comes first and the
    # package is built without build isolation (which would fetch a second torch).
    python -m pip install --quiet "torch>=2.6" "setuptools>=77" wheel
    python -m pip install --quiet --no-build-isolation -e ".[test,train,plot,collect,dropins]"
    # torchtune's KD losses (tests/compat) need torch only; its own dependencies pin what we don't use.
    python -m pip install --quiet --no-deps "torchtune>=0.6"
    echo "$digest" > "$stamp"
fi

job=${1:-demo}
shift || true
case "$job" in
    test)
        exec python -m pytest -q "$@"
        ;;
    *)
        exec distillkit "$job" "$@"
        ;;
esac
