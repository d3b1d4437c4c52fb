#!/usr/bin/env bash
# The runs the README's results cite (issue 11: calibration and the budget planner), one after the other on a quiet
# machine. Each bench resumes when re-run. Usage: bash benchmarks/planner_runs.sh [fp32|paths|bf16 ...]
set -euo pipefail
cd "$(dirname "$0")/.."
FS=".venv/bin/falconspec"
OUT=benchmarks/results
runs=("${@:-fp32 paths bf16}")
for run in ${runs[@]}; do
  case "$run" in
    fp32)  # MT-bench 80, both turns, every engine drafter under the planner
      $FS calibrate --model smollm2-135m
      $FS bench --methods greedy pld falcon eagle medusa lookahead --datasets mt-bench --max-new-tokens 64 \
        --out $OUT/mt-bench-80-planner --no-progress --resume ;;
    paths)  # each product path forced in turn, 10 MT-bench first turns
      for path in auto stock few-row; do
        $FS bench --methods greedy pld falcon eagle --datasets mt-bench --max-turns 1 --num-prompts 10 \
          --max-new-tokens 64 --matmul-path $path --out $OUT/mt-bench-10-path-$path --no-progress --resume
      done ;;
    bf16)  # MT-bench 80 in bf16, answers checked against the fp32 model
      $FS calibrate --model smollm2-135m --dtype bfloat16 --drafters falcon eagle pld
      $FS bench --methods greedy pld falcon eagle --datasets mt-bench --max-new-tokens 64 --dtype bfloat16 \
        --out $OUT/mt-bench-80-bf16-planner --no-progress --resume ;;
    *) echo "unknown run $run (fp32, paths, bf16)"; exit 2 ;;
  esac
done
