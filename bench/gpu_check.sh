#!/usr/bin/env bash
# The first-GPU check in one command (bench/README.md, "GPU check"): from the source tree, no `pip install -e .`.
#
#   bash bench/gpu_check.sh              # on the CUDA machine: results in $OUT, else bench/results/gpu-check-<date>/
#   bash bench/gpu_check.sh --rehearse   # here, on CPU: every part with tiny shapes and the Triton interpreter
#
# 1. Installs the wheels carried in wheels/ (bench/gpu_wheels.sh fetched them) into a temporary target, without
#    an index or dependencies, and puts it on PYTHONPATH after the repository. With --rehearse nothing is
#    installed: the local environment has every package, and the carried wheels are for CPython 3.12.
# 2. Runs python -m bench.gpu_check with the remaining arguments (see its --help).
# Environment: PYTHON (default: python3, or .venv/bin/python where the repository has one).
set -u
cd "$(dirname "$0")/.."
REPO=$(pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
rehearse=0
for arg in "$@"; do [ "$arg" = "--rehearse" ] && rehearse=1; done

SITE=""
shopt -s nullglob
wheels=("$REPO"/wheels/*.whl)
if [ "$rehearse" = 0 ] && [ ${#wheels[@]} -gt 0 ]; then
    SITE=$(mktemp -d "${TMPDIR:-/tmp}/sonic_rt_site.XXXXXX")
    trap 'rm -rf "$SITE"' EXIT
    echo "gpu_check.sh: installing ${#wheels[@]} carried wheels into $SITE"
    if ! "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${wheels[@]}"; then
        echo "gpu_check.sh: warning: installing the carried wheels failed; the parts that need them will say so" >&2
    fi
    export SONIC_RT_GPU_CHECK_WHEELS="$(cd "$REPO/wheels" && echo *.whl)"
fi
export PYTHONPATH="$REPO${SITE:+:$SITE}${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -m bench.gpu_check "$@"
exit $?
