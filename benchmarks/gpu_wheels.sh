#!/usr/bin/env bash
# The pure-Python packages the device check needs that the GPU image lacks, as wheels in .whl/
# (ignored by git; name it in the device tool's `carry`). Run here, where pip reaches the index:
#   benchmarks/gpu_wheels.sh
# then on the device (README: "Running the device check"):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
rm -rf .whl && mkdir -p .whl
# the image's Python is 3.12; these are pure Python, so any platform tag works
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any -d .whl \
    "hydra-core==1.3.2" "omegaconf==2.3.0" "liger-kernel==0.6.2"
# antlr4's runtime (omegaconf's parser) is published as a source archive only: build its wheel
"$PY" -m pip wheel -q --no-deps -w .whl "antlr4-python3-runtime==4.9.3"
ls -l .whl
