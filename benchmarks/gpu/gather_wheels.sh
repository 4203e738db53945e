#!/usr/bin/env bash
# Run on the CPU machine (it reaches PyPI) before a device run: gathers what the GPU check needs that the
# device image lacks into benchmarks/gpu/carry/ (git-ignored), to be named in the device tool's `carry`.
#   wheels/  trl, datasets, liger-kernel, pydantic and their small pure-python needs, for CPython 3.12 x86-64,
#            --no-deps, pinned to the versions this project is tested with (transformers 5.17 / torch 2.11 there:
#            trl 1.16 needs transformers>=4.56.2, liger-kernel 0.8.5 torch>=2.1.2 + triton>=2.3.1)
#   rmb/     the RMB sample files (third-party data: copied for the run, never committed)
# Usage: bash benchmarks/gpu/gather_wheels.sh [RMB_DIR]    (default: shared/benchmarks/rmb beside the checkout)
set -euo pipefail
cd "$(dirname "$0")"
CARRY=carry
RMB_DIR=${1:-}
if [ -z "$RMB_DIR" ]; then  # a checkout's ../shared, or a worktree's ../../shared
  for d in ../../../shared/benchmarks/rmb ../../../../shared/benchmarks/rmb; do [ -d "$d" ] && RMB_DIR=$d && break; done
fi
PINS=(
  trl==1.16.0 datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19 liger-kernel==0.8.5
  pydantic==2.13.4 pydantic-core==2.46.4 annotated-types==0.7.0 typing-inspection==0.4.2
)
mkdir -p "$CARRY/wheels"
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$CARRY/wheels" "${PINS[@]}"
if [ -n "$RMB_DIR" ] && [ -d "$RMB_DIR" ]; then
  mkdir -p "$CARRY/rmb" && cp "$RMB_DIR"/*.json "$CARRY/rmb/"
else
  echo "no RMB samples at $RMB_DIR: the eval-rm row will be skipped" >&2
fi
du -sh "$CARRY"
echo "carry: [\"benchmarks/gpu/carry\"]   (must stay under 64 MiB with the working tree)"
