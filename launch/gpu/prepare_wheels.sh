#!/usr/bin/env bash
# Run HERE (a machine with PyPI access), before a GPU session: puts into .whl/ every wheel the GPU
# machine lacks for launch/gpu/check.sh (python 3.12, x86-64, no network there). About 12 MiB.
#
#   bash launch/gpu/prepare_wheels.sh        then carry ".whl" with the device command
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
out=.whl
rm -rf "$out" && mkdir -p "$out"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# Missing on the GPU image (see the device tool's KINDS.md): the data path (webdataset, zstandard),
# DeepSpeed's pure-Python needs, and the optional baseline. The project itself is installed there
# from the checkout by check.sh, so the wheels never go stale.
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$out" \
  zstandard==0.25.0 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 \
  typing-inspection==0.4.2 hjson==3.1.0 webdataset==1.0.2 braceexpand==0.1.7 \
  megabyte-pytorch==0.3.6 beartype==0.22.9
# DeepSpeed publishes no wheel: build one without its C++ ops (they JIT-compile there if needed)
DS_ACCELERATOR=cuda DS_BUILD_OPS=0 python3 -m pip wheel -q --no-deps --no-build-isolation -w "$out" deepspeed==0.19.8
ls -la "$out"
du -sh "$out"
