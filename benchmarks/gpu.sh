#!/usr/bin/env bash
# The GPU benchmark set of docs/performance.md ("On a GPU"), one JSON line per
# configuration on stdout (and appended to $1 when given):
#   bash benchmarks/gpu.sh [RESULTS.jsonl]
# FC and Conv pretraining at the reference batches with whole 50,000-image
# epochs timed (--epoch), then the MAE (seed) in bfloat16 with each attention
# form. A configuration that fails is reported on stderr and the rest still
# run; the exit status is 1 then.
set -uo pipefail
out=${1:-/dev/null}
python=${PYTHON:-python}
status=0
bench() {
  "$python" -m mil_jax.bench --seconds 1 --windows 3 "$@" | tee -a "$out" || status=1
}

bench --model fc --batch 128 --epoch
bench --model conv:192 --batch 32,128 --epoch
bench --model conv:256 --batch 32 --epoch
bench --model mae:seed,attention=xla --batch 1024,4096 --dtype bfloat16
bench --model mae:seed,attention=cudnn --batch 4096 --dtype bfloat16
exit $status
