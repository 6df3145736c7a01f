#!/usr/bin/env bash
# Sets up .venv from the project's own files (once), then runs the demo or the tests.
#   bash scripts/run.sh demo   train on four FLAIR #2 regions, evaluate on the unseen D004
#   bash scripts/run.sh test   the test suite
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
if [ ! -x "$VENV/bin/python" ] || [ ! -f "$VENV/.installed" ] || [ pyproject.toml -nt "$VENV/.installed" ]; then
  "$PY" -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch and torchvision as a matching pair first (this machine's disk holds both; a bare
  # `torch` requirement would download a multi-GB build). timm, open_clip and torchgeo, the
  # test references, need torchvision, and PyPI's torchvision only loads beside its own torch.
  "$VENV/bin/python" -m pip install -q "torch==2.14.1" "torchvision==0.29.1"
  "$VENV/bin/python" -m pip install -q -e ".[test]"
  touch "$VENV/.installed"
fi
case "${1:-}" in
  demo)
    shift
    exec "$VENV/bin/python" -m spectralmoe_jax.main --config configs/demo.py --workdir "${WORKDIR:-runs/demo}" --mode demo "$@" ;;
  test)
    shift
    exec "$VENV/bin/python" -m pytest -n 2 --dist loadfile "$@" ;;
  *)
    echo "usage: bash scripts/run.sh demo|test [extra args]" >&2; exit 2 ;;
esac
