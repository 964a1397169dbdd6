#!/usr/bin/env bash
# Download, on this (CPU) machine, the wheels the device run may need into .whl/ at the repository
# root, for the device machine's Python 3.12 on x86-64 (the device README's recipe).  The device
# machine cannot reach a package index; a `run` call that names ".whl" in carry takes them along
# and benchmarks/gpu_check.sh installs them when the machine's own numba-cuda does not do.
#
#     bash benchmarks/gpu_wheels.sh                       # numba-cuda==0.30.4 (the project pins < 0.31)
#     bash benchmarks/gpu_wheels.sh nvidia-nvvm==13.0.88  # and any further NAME==VERSION
#
# Not carried: CuPy (the image has cupy-cuda13x; a CuPy wheel is over 100 MB and the working
# tree that travels is limited to 64 MiB), torch, JAX, numba (the image's), the cuda-* packages.
# .whl/ is added to .git/info/exclude so that it is never committed.
case "${1:-}" in  # the comment block above is the help
  -h|--help) sed -n '2,/^[^#]/p' "$0" | sed -e '/^[^#]/d' -e 's/^# \{0,1\}//'; exit 0 ;;
esac
for spec in "$@"; do
  case "$spec" in
    *==*) ;;
    *) echo "gpu_wheels.sh: each argument must be NAME==VERSION (--help), got: $spec" >&2; exit 2 ;;
  esac
done
set -euo pipefail
cd "$(dirname "$0")/.."
PYVER=${GPU_PYTHON_VERSION:-3.12}
NUMBA_CUDA=${NUMBA_CUDA_VERSION:-0.30.4}
DEST=.whl

exclude="$(git rev-parse --git-common-dir)/info/exclude"
mkdir -p "$(dirname "$exclude")"
grep -qxF "/$DEST/" "$exclude" 2>/dev/null || echo "/$DEST/" >>"$exclude"
mkdir -p "$DEST"

platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_24 manylinux_2_17 manylinux2014 manylinux1; do
    platforms+=(--platform "${tag}_x86_64")
done
for spec in "numba-cuda==$NUMBA_CUDA" "$@"; do
    name=${spec%%[=<>!~]*}
    stem=$(echo "$name" | tr '-' '_')
    # one version of each package: two stop the whole install on the device
    find "$DEST" -maxdepth 1 -iname "${stem}-*.whl" ! -iname "${stem}-${spec##*==}-*.whl" -delete
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$PYVER" --implementation cp \
        "${platforms[@]}" -d "$DEST" "$spec"
done
ls -la "$DEST"
size_kb=$(du -sk "$DEST" | cut -f1)
echo "$DEST: ${size_kb} KiB (the travelling tree, wheels included, must stay under 64 MiB)"
[ "$size_kb" -lt 40000 ] || { echo "gpu_wheels: $DEST is over 40 MiB: carry fewer wheels" >&2; exit 1; }
