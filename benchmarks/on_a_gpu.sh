#!/usr/bin/env bash
# Every GPU check of benchmarks/README.md in one command, sized for a 15-minute lease of one GPU (about 8 minutes
# on an H200): the CUDA tests, records against x.sum() of the same tensors, the flight recorder's cost (as before
# issue 34, as shipped, and with its guard: issue 34 asks the guard's cost on a GPU), the every-50 totals, and last
# (the first to go if the lease runs out) where a logging step's time goes (torch.profiler).
# Each step has its own time limit, so that a slow one leaves the others their time; the logs go to $1 (default
# gpu-logs/) and the end of each is printed. On a lent machine run `bash benchmarks/on_a_gpu.sh "$OUT"`: the logs come
# back as files, whole, where the printed ends may be cut.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:-gpu-logs}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1
step() {  # name, seconds, command... (TAIL: the lines of its log printed, 25 unless set)
  local name=$1 seconds=$2
  shift 2
  echo "== $name ($(date +%T))"
  timeout "$seconds" "$@" >"$out/$name.log" 2>&1
  echo "   exit $?"
  tail -n "${TAIL:-25}" "$out/$name.log"
}
nvidia-smi -L
step cuda-tests 150 python -m pytest tests/test_cuda.py -rA -p no:cacheprovider
step records 60 python benchmarks/overhead.py --records
step flight 180 python benchmarks/overhead.py --flight-variants --models gpt2-124m resnet50 --rounds 1
step every-50 240 python benchmarks/overhead.py --gpu --every 50 --rounds 1 --json "$out/every-50.json"
TAIL=40 step profile 90 python benchmarks/logging_step_ops.py --profile
