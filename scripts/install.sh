#!/usr/bin/env bash
# Creates .venv (if missing) and installs bmm_ppl into it with its test extra.
#
# Torch: a torch already importable by the interpreter that makes the venv (for example a CUDA
# build on a GPU machine) is kept, by giving the venv access to the system site-packages. Otherwise
# torch==2.13.0 is installed first: on our CPU machines pip takes that release from disk, so no
# multi-GB CUDA build is ever downloaded.
set -euo pipefail
PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
    if "$PYTHON" -c "import torch" >/dev/null 2>&1; then
        echo "install: keeping the torch of $PYTHON ($("$PYTHON" -c 'import torch; print(torch.__version__)'))"
        "$PYTHON" -m venv --system-site-packages "$VENV"
    else
        "$PYTHON" -m venv "$VENV"
    fi
fi
if ! "$VENV/bin/python" -c "import torch" >/dev/null 2>&1; then
    "$VENV/bin/pip" install --quiet "torch==2.13.0"
fi
"$VENV/bin/pip" install --quiet -e ".[test]"
"$VENV/bin/python" -c "import bmm_ppl, torch; print('install: bmm_ppl', bmm_ppl.__version__, 'with torch', torch.__version__)"
