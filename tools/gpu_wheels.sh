#!/usr/bin/env bash
# Downloads into .whl/ the wheels jaxsft needs that the borrowed GPU machine's
# image lacks (Python 3.12; its image has jax, flax, optax, orbax, torch,
# transformers, peft, pyarrow, pandas, fsspec, xxhash, but not datasets, its
# dill and multiprocess, nor ml-collections; nor bitsandbytes, the QLoRA peer's
# 4-bit layers: 43 MB, within a carry's 64 MiB), so that a GPU session carries
# them instead of spending device time on a missing import:
#
#   tools/gpu_wheels.sh          # here, before the session's first device call
#   (device call, carry [".whl"]) tools/gpu_bench.sh /tmp/gb   # installs .whl/ itself
#
# The versions are the ones this repository's CPU environment runs (.venv);
# all but bitsandbytes (its CUDA kernels inside) are pure-Python wheels.
# .whl/ is kept out of git through
# .git/info/exclude.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VPY=.venv/bin/python
[ -x "$VPY" ] || VPY=$PY
version() {  # the version installed in .venv, else the newest
  "$VPY" -c "import importlib.metadata as m; print(m.version('$1'))" 2>/dev/null || true
}
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo /.whl/ >> .git/info/exclude
rm -rf .whl
mkdir -p .whl
for name in datasets dill multiprocess ml-collections bitsandbytes; do
  v=$(version "$name")
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux_2_24_x86_64 -d .whl "$name${v:+==$v}"
done
ls -l .whl
du -sh .whl
