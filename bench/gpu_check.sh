#!/bin/sh
# `make gpu-check` without make: on a GPU machine that reaches no registry, install the wheels `make gpu-wheels`
# downloaded (build/gpu-wheels, carried along) into build/gpu-site, then run bench/gpu_check.py on tinylm's source with
# that machine's own python3 (or $PYTHON). Arguments go to gpu_check.py.
set -e
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ -d build/gpu-wheels ]; then
  "$PYTHON" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target build/gpu-site build/gpu-wheels/*.whl
fi
PYTHONPATH="$PWD/src:$PWD/build/gpu-site${PYTHONPATH:+:$PYTHONPATH}" exec "$PYTHON" -u bench/gpu_check.py "$@"
