#!/usr/bin/env bash
# Fetch, here, what bench/gpu_check.sh needs on the GPU machine that its image lacks, into wheels/ (git-ignored;
# name it in the device tool's `carry`), and check that it plus the working tree fits the 64 MiB that travels.
#
#   bash bench/gpu_wheels.sh            # diffusers + soxr + av (PyAV, ~35 MB: the throughput part writes mp4s)
#   bash bench/gpu_wheels.sh --no-av    # ~7 MB; the throughput part is then skipped, and says why
#
# The image (Python 3.12, torch 2.11, triton 3.6, transformers, huggingface_hub, safetensors, pillow, opencv,
# scikit-image, matplotlib, pytest: /work/.library/device/KINDS.md) lacks diffusers, PyAV and soxr. Every
# dependency of diffusers is in the image, so the wheels are fetched with --no-deps. sonic_rt imports PyAV and
# soxr lazily (sonic_rt/_lazy.py), so without them everything but decoding audio files and writing mp4s runs.
# Versions: the ones installed in this environment (what the tests here ran with), else the newest.
#
# It also writes wheels/inputs/: the portrait and the espeak-ng speech the throughput part reads (the GPU
# machine has no espeak-ng), via python -m bench.gpu_check --prepare-inputs.
set -eu
cd "$(dirname "$0")/.."
REPO=$(pwd)
if [ -z "${PYTHON:-}" ]; then
    if [ -x "$REPO/.venv/bin/python" ]; then PYTHON="$REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
LIMIT=$((64 * 1024 * 1024))
packages=(diffusers soxr av)
[ "${1:-}" = "--no-av" ] && packages=(diffusers soxr)

pinned=()
for name in "${packages[@]}"; do
    version=$("$PYTHON" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: pass" "$name")
    pinned+=("$name${version:+==$version}")
done

rm -rf wheels/*.whl
mkdir -p wheels
echo "gpu_wheels.sh: downloading ${pinned[*]} for CPython 3.12 manylinux x86-64"
"$PYTHON" -m pip download -q --only-binary=:all: --no-deps --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 -d wheels "${pinned[@]}"

echo "gpu_wheels.sh: writing the throughput inputs into wheels/inputs"
rm -rf wheels/inputs
PYTHONPATH="$REPO" "$PYTHON" -m bench.gpu_check --prepare-inputs wheels/inputs

# What travels: tracked files, untracked files git does not ignore, shared/, and the carried wheels/.
"$PYTHON" - "$LIMIT" <<'PY'
import os, subprocess, sys
limit = int(sys.argv[1])
def files(*args):
    out = subprocess.run(["git", "ls-files", "-z", *args], capture_output=True, check=True).stdout
    return [p for p in out.decode().split("\0") if p]
tree = sum(os.path.getsize(p) for p in files() + files("--others", "--exclude-standard") if os.path.isfile(p))
shared = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk("shared") for f in fs) if os.path.isdir("shared") else 0
wheels = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk("wheels") for f in fs)
total = tree + shared + wheels
mib = lambda n: f"{n / 2**20:.1f} MiB"
for name in sorted(os.listdir("wheels")):
    path = os.path.join("wheels", name)
    if os.path.isfile(path):
        print(f"  {name}  {mib(os.path.getsize(path))}")
print(f"gpu_wheels.sh: working tree {mib(tree)} + shared/ {mib(shared)} + wheels/ {mib(wheels)} = {mib(total)} "
      f"of {mib(limit)}")
if total > limit:
    sys.exit("gpu_wheels.sh: too large to travel: drop PyAV (--no-av) or untracked files")
PY
echo "gpu_wheels.sh: ready. On the device: carry [\"wheels\"], command: bash bench/gpu_check.sh"
