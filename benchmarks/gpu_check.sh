#!/usr/bin/env bash
# Issue 20's whole device run in one command (docs/gpu.md): set up, then benchmarks/gpu_check.py
# runs pytest -m cuda on the real kernels, the top-k vs SDPA benchmark, train-toy --device gpu,
# eval and the GPU interop tests within one time budget, and writes logs and gpu_check.json
# under $OUT.  Run from anywhere on the device machine:
#
#     bash benchmarks/gpu_check.sh              # GPU_CHECK_BUDGET=330 seconds for the stages
#
# Setup uses the machine's own python3 (the image's, with CuPy, torch, JAX, numba, numba-cuda,
# pytest, pytest-xdist).  numba-cuda: the machine's when a probe kernel runs with it and its
# version is < 0.31 (the project's pin); otherwise the wheels carried in .whl/ (made here by
# benchmarks/gpu_wheels.sh) are installed into /tmp/site and put first on PYTHONPATH.
# GPU_CHECK_WHEELS=always|never|auto (default auto) forces the choice.  topkattn itself is not
# installed: the checkout is on PYTHONPATH and gpu_check.py loads cli/ as topkattn.cli.
# For a rerun after a fix: GPU_CHECK_STAGES="probe pytest_cuda" (a subset of probe pytest_cuda bench
# train_toy eval pytest_extra), GPU_CHECK_CUDA_TESTS="-m cuda tests/test_cuda_kernels.py -k mla",
# GPU_CHECK_TRAIN_ARGS="--steps 300", GPU_CHECK_WORKERS=8 (pytest-xdist workers).
case "${1:-}" in  # the comment block above is the help
  -h|--help) sed -n '2,/^[^#]/p' "$0" | sed -e '/^[^#]/d' -e 's/^# \{0,1\}//'; exit 0 ;;
esac
if [ "$#" -gt 0 ]; then
  echo "gpu_check.sh takes no arguments (settings are the GPU_CHECK_* environment variables; --help), got: $*" >&2
  exit 2
fi
set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD
T0=$(date +%s)
BUDGET=${GPU_CHECK_BUDGET:-330}
OUT=${OUT:-/tmp/gpu_check_out}  # the device tool sets OUT; its files come back
mkdir -p "$OUT"
PY=${GPU_CHECK_PYTHON:-python3}
WHEELS=${GPU_CHECK_WHEELS:-auto}

unset NUMBA_ENABLE_CUDASIM  # real kernels: tests/conftest.py leaves the simulator off on a GPU
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
if [ -z "${CUDA_HOME:-}" ] && [ -d /usr/local/cuda ]; then
    export CUDA_HOME=/usr/local/cuda  # where numba-cuda finds NVVM when no nvidia-nvvm wheel is installed
fi

probe() { timeout 120 "$PY" benchmarks/gpu_check.py probe; }

setup() {
    echo "== gpu_check setup $(date -u +%FT%TZ) in $ROOT, budget ${BUDGET}s"
    uname -srm
    nvidia-smi --query-gpu=name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,temperature.gpu \
        --format=csv 2>&1
    command -v nvcc >/dev/null && nvcc --version | tail -n 2
    echo "python: $(command -v "$PY") $("$PY" -V 2>&1)"
    echo "CUDA_HOME=${CUDA_HOME:-} nvvm: $(ls "${CUDA_HOME:-/nonexistent}"/nvvm/lib64 2>/dev/null | tr '\n' ' ')"
    ls -la .whl 2>/dev/null
    echo "== probe with the machine's packages"
    probe
    local rc=$?
    echo "probe rc=$rc (0 ok, 3 kernel failed, 4 numba-cuda >= 0.31)"
    local use_wheels=0
    case "$WHEELS" in
        always) use_wheels=1 ;;
        never) use_wheels=0 ;;
        *) [ "$rc" -ne 0 ] && use_wheels=1 ;;
    esac
    if [ "$use_wheels" = 1 ]; then
        if ls .whl/*.whl >/dev/null 2>&1; then
            echo "== installing the carried wheels into /tmp/site"
            "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
                --target /tmp/site .whl/*.whl
            local old=$PYTHONPATH
            export PYTHONPATH="$ROOT:/tmp/site${old#"$ROOT"}"
            probe
            local rc2=$?
            echo "probe with the carried wheels rc=$rc2"
            if [ "$rc2" -ne 0 ] && [ "$rc" -eq 4 ] && [ "$WHEELS" != always ]; then
                echo "== the carried wheels fail where the machine's numba-cuda ran: back to the machine's"
                export PYTHONPATH=$old
            fi
        else
            echo "== no .whl/*.whl carried (make them here with: bash benchmarks/gpu_wheels.sh)"
        fi
    fi
    echo "PYTHONPATH=$PYTHONPATH"
    echo "== setup took $(( $(date +%s) - T0 )) s"
}

setup >"$OUT/setup.log" 2>&1  # not a pipeline: its exports stay in this shell
tail -n 30 "$OUT/setup.log" | cut -c1-400

LEFT=$(( BUDGET - ($(date +%s) - T0) ))
[ "$LEFT" -lt 60 ] && LEFT=60
# the stages end by the deadline; SIGINT (then SIGKILL) is the backstop if gpu_check.py hangs
timeout -s INT -k 30 $(( LEFT + 45 )) "$PY" benchmarks/gpu_check.py run --out "$OUT" \
    --deadline $(( $(date +%s) + LEFT ))
rc=$?
echo "gpu_check.sh: rc=$rc after $(( $(date +%s) - T0 )) s; files in $OUT:"
ls -la "$OUT"
exit $rc
