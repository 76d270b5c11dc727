#!/usr/bin/env bash
# Run HERE (a machine with PyPI access), before a GPU session: puts into .whl/ every wheel the GPU
# machine lacks for launch/gpu/check.sh (python 3.12, x86-64, no network there). About 12 MiB.
#
#   bash launch/gpu/prepare_wheels.sh        then carry ".whl" with the device command
# Works from the project's venv (its python and pip; VIRTUAL_ENV or .venv beside the checkout) or any
# python3 with pip; prints what it carried. check.sh installs these into their own folder, after the
# project, so neither install replaces the other's files.
set -euo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$repo"
py="${PYTHON:-}"
if [ -z "$py" ]; then
  if [ -n "${VIRTUAL_ENV:-}" ] && [ -x "$VIRTUAL_ENV/bin/python" ]; then py="$VIRTUAL_ENV/bin/python"
  elif [ -x "$repo/.venv/bin/python" ]; then py="$repo/.venv/bin/python"
  else py=python3; fi
fi
"$py" -m pip --version > /dev/null || { echo "prepare_wheels: $py has no pip" >&2; exit 1; }
echo "prepare_wheels: using $py ($("$py" -c 'import sys; print(sys.version.split()[0])'))"
out=.whl
rm -rf "$out" && mkdir -p "$out"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
# Missing on the GPU image (see the device tool's KINDS.md): the data path (webdataset, zstandard),
# DeepSpeed's pure-Python needs, and the optional baseline. The project itself is installed there
# from the checkout by check.sh, so the wheels never go stale.
timeout 300 "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  "${platforms[@]}" -d "$out" \
  zstandard==0.25.0 pydantic==2.12.5 pydantic-core==2.41.5 annotated-types==0.7.0 \
  typing-inspection==0.4.2 hjson==3.1.0 webdataset==1.0.2 braceexpand==0.1.7 \
  megabyte-pytorch==0.3.6 beartype==0.22.9
# DeepSpeed publishes no wheel: build one without its C++ ops (they JIT-compile there if needed)
DS_ACCELERATOR=cuda DS_BUILD_OPS=0 timeout 600 "$py" -m pip wheel -q --no-deps --no-build-isolation -w "$out" deepspeed==0.19.8
echo "prepare_wheels: carried in $out (carry [\".whl\"] with the device command):"
for w in "$out"/*.whl; do printf '  %-70s %6s KiB\n' "$(basename "$w")" "$(( $(stat -c %s "$w") / 1024 ))"; done
echo "  total $(du -sh "$out" | cut -f1)"
