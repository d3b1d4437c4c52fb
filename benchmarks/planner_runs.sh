#!/usr/bin/env bash
# The runs the README's results cite (issue 11: calibration and the budget planner), one after the other on a quiet
# machine. Each bench resumes when re-run. Usage: bash benchmarks/planner_runs.sh [fp32] [paths] [bf16] [bf16-80]
# DRAFTER@N is the drafter with a fixed N-node tree: the hand-tuned default before the planner (4 nodes in float32).
set -euo pipefail
cd "$(dirname "$0")/.."
FS=".venv/bin/falconspec"
OUT=benchmarks/results
PROMPTS="${PROMPTS:-16}"
METHODS="${METHODS:-greedy falcon eagle pld falcon@4 eagle@4 pld@4}"  # fp32 run; NAME: its results directory
NAME="${NAME:-mt-bench-$PROMPTS-planner}"
runs=("$@"); [[ $# -gt 0 ]] || runs=(fp32 paths bf16)
for run in "${runs[@]}"; do
  case "$run" in
    fp32)  # MT-bench, both turns: the planner against the hand-tuned 4-node budgets, in one interleaved run
      $FS calibrate --model smollm2-135m
      $FS bench --methods $METHODS --datasets mt-bench --max-new-tokens 64 \
        --num-prompts "$PROMPTS" --out "$OUT/$NAME" --no-progress --resume ;;
    paths)  # each product path forced in turn, MT-bench first turns
      for path in auto stock few-row onednn; do
        $FS bench --methods greedy falcon eagle --datasets mt-bench --max-turns 1 --num-prompts 8 \
          --max-new-tokens 64 --matmul-path $path --out $OUT/mt-bench-8-path-$path --no-progress --resume
      done ;;
    bf16)  # bf16, answers checked against the fp32 model (a CPU without native bf16 runs it slowly: fewer prompts)
      $FS calibrate --model smollm2-135m --dtype bfloat16 --drafters falcon eagle pld --quick
      $FS bench --methods greedy falcon eagle pld --datasets mt-bench --max-new-tokens 32 --dtype bfloat16 \
        --max-turns 1 --num-prompts "${BF16_PROMPTS:-6}" --out $OUT/mt-bench-${BF16_PROMPTS:-6}-bf16-planner \
        --no-progress --resume ;;
    bf16-80)  # bf16 on a CPU with native bf16: all 80 questions, both turns, every drafter, checked against fp32
      $FS calibrate --model smollm2-135m --dtype bfloat16
      $FS bench --methods greedy falcon eagle pld medusa lookahead --datasets mt-bench --max-new-tokens 64 \
        --dtype bfloat16 --num-prompts 80 --out $OUT/mt-bench-80-bf16 --no-progress --resume ;;
    *) echo "unknown run $run (fp32, paths, bf16, bf16-80)"; exit 2 ;;
  esac
done
