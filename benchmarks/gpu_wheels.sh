#!/bin/sh
# The wheels a bare GPU machine (Python 3.12, x86-64, torch + torchvision + timm installed, no network)
# lacks for ensemble-kd, downloaded here into .whl/ (ignored by git) to be carried there.
#
#   sh benchmarks/gpu_wheels.sh            # here, where PyPI is reachable
#
# Then, on the GPU machine, in the repository root, one line (it installs them beside the system
# packages and runs the check; about 8 minutes on one H200):
#
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && PYTHONPATH=/tmp/site:src python3 benchmarks/gpu_check.py
#
# pydantic pins pydantic-core exactly; typing-extensions comes too because pydantic needs >= 4.16.
set -eu
cd "$(dirname "$0")/.."
mkdir -p .whl
for pkg in pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 \
           typing-extensions==4.16.0 tfrecord==1.14.4 crc32c==2.9.post0; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$pkg"
done
ls .whl
