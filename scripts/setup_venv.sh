#!/usr/bin/env bash
# Builds ./.venv from nothing: torch, torchvision, Detectron2, the remaining dependencies and fgd_d2 (editable).
# Idempotent: a stamp file keyed on the pinned versions and on setup.py makes a second run return in seconds.
#
# Detectron2 is not published on PyPI under its own name. By default it is installed from `sal-detectron2`,
# a republication of upstream Detectron2 (commit a59f056) whose wheel is tagged for Python 3.10 only; its
# pure-Python sources run on 3.11, and nothing fgd_d2 uses needs its compiled ops.
# Users who can reach GitHub may install upstream instead:
#     DETECTRON2_SPEC='git+https://github.com/facebookresearch/detectron2.git' make test
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$ROOT/.venv}"
PYTHON="${PYTHON:-python3}"
TORCH_VERSION="2.14.1"
TORCHVISION_VERSION="0.29.1"
DETECTRON2_SPEC="${DETECTRON2_SPEC:-sal-detectron2==0.7.2}"
DEPS=(
  "fvcore>=0.1.5,<0.1.6" "iopath>=0.1.7,<0.1.10" pycocotools opencv-python-headless yacs
  "omegaconf>=2.1,<2.4" "hydra-core>=1.1" tabulate termcolor cloudpickle tqdm tensorboard matplotlib Pillow
  packaging "setuptools<81" pytest
)

fail() { echo "setup_venv: ERROR: $*" >&2; exit 1; }

key="torch=$TORCH_VERSION torchvision=$TORCHVISION_VERSION detectron2=$DETECTRON2_SPEC deps=${DEPS[*]} setup=$(sha1sum "$ROOT/setup.py" | cut -c1-12)"
stamp="$VENV/.fgd_d2_setup_stamp"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$key" ]]; then
  exit 0
fi

command -v "$PYTHON" >/dev/null || fail "'$PYTHON' not found; set PYTHON=/path/to/python3.11"
"$PYTHON" -c 'import sys; assert sys.version_info[:2] >= (3, 9)' || fail "Python >= 3.9 is required"

echo "setup_venv: building $VENV (first run takes a few minutes)"
[[ -x "$VENV/bin/python" ]] || "$PYTHON" -m venv "$VENV" || fail "could not create a venv at $VENV"
PY="$VENV/bin/python"
PIP=("$PY" -m pip install --disable-pip-version-check -q)

"${PIP[@]}" "torch==$TORCH_VERSION" "torchvision==$TORCHVISION_VERSION" \
  || fail "could not install torch==$TORCH_VERSION torchvision==$TORCHVISION_VERSION"
"${PIP[@]}" "${DEPS[@]}" || fail "could not install the dependencies: ${DEPS[*]}"

SITE="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if [[ "$DETECTRON2_SPEC" == sal-detectron2* ]]; then
  "${PIP[@]}" --no-deps --only-binary=:all: --python-version 3.10 --implementation cp --upgrade \
    --target "$SITE" "$DETECTRON2_SPEC" || fail "could not install $DETECTRON2_SPEC"
  # The wheel ships a top-level `tools` package that would shadow anything else named `tools`.
  rm -rf "$SITE/tools"
else
  "${PIP[@]}" --no-build-isolation "$DETECTRON2_SPEC" || fail "could not install Detectron2 from $DETECTRON2_SPEC"
fi

"${PIP[@]}" --no-deps -e "$ROOT" || fail "could not install fgd_d2 from $ROOT"
"$PY" -c 'import torch, torchvision.ops, detectron2.modeling, fgd_d2' \
  || fail "the installed stack does not import; remove $VENV and run again"

echo "$key" > "$stamp"
echo "setup_venv: ready ($VENV)"
