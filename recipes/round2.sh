#!/usr/bin/env bash
# Round 2 of the built-in model's drafters: more self-distilled data, then fine-tune the shipped Falcon (k=2) and
# EAGLE-style (k=1) drafters on it and train Medusa heads on the same data. Resumable: re-run the same command
# (finished shards and checkpoints are kept). Run it in the background:
#   nohup bash recipes/round2.sh data > runs/round2-data.log 2>&1 &
#   nohup bash recipes/round2.sh train > runs/round2-train.log 2>&1 &
# Stages: data | train | fixed | ship (ship copies the finished drafters into src/falconspec/assets/drafters/).
# fixed: the "fixed" training mode from scratch (the dataset's own answers, as the paper), for comparison.
set -euo pipefail
cd "$(dirname "$0")/.."
FS="$PWD/.venv/bin/falconspec"
TORCHRUN="$PWD/.venv/bin/torchrun"
RUNS="${RUNS:-runs}"
N_TRAIN="${N_TRAIN:-1600}"   # first N train-split ShareGPT conversations (self-distilled first-turn answers)
STEPS="${STEPS:-1200}"       # fine-tuning steps per SAR drafter
ROUND="${ROUND:-2}"          # run names: falcon-r$ROUND, eagle-r$ROUND, medusa-r$ROUND (recipes/round3.sh sets 3)
MEDUSA=(${MEDUSA_ARGS:---draft-vocab 4096 --vocab-corpus sharegpt --lr 1e-3 --min-lr 1e-4 --max-steps 600})
export HF_HUB_OFFLINE=1
COMMON_DATA=(--max-len 256 --max-new-tokens 160 --shard-size 16 --dtype float32 --gen-dtype bfloat16)
COMMON_TRAIN=(--eval-data "$RUNS/data/sd-heldout" --max-len 256 --batch-size 4 --eval-every 100 --save-every 100
              --log-every 10 --eval-samples 48)

case "${1:?usage: round2.sh data|train|fixed|ship}" in
data)
  "$FS" -v gen-data --mode self-distilled --split heldout --limit 48 "${COMMON_DATA[@]}" --out "$RUNS/data/sd-heldout"
  OMP_NUM_THREADS=1 "$TORCHRUN" --nproc_per_node 2 --rdzv-backend c10d --rdzv-endpoint localhost:0 "$FS" -v gen-data \
    --mode self-distilled --split train --limit "$N_TRAIN" "${COMMON_DATA[@]}" --out "$RUNS/data/sd-train"
  ;;
train)
  # the two SAR drafters side by side, one core each; then the Medusa heads
  OMP_NUM_THREADS=1 "$FS" -v train --data "$RUNS/data/sd-train" --out "$RUNS/falcon-r$ROUND" --init-from falcon --k 2 \
    --lr 5e-4 --min-lr 5e-5 --warmup 20 --max-steps "$STEPS" "${COMMON_TRAIN[@]}" > "$RUNS/falcon-r$ROUND.log" 2>&1 &
  OMP_NUM_THREADS=1 "$FS" -v train --data "$RUNS/data/sd-train" --out "$RUNS/eagle-r$ROUND" --init-from eagle --k 1 \
    --lr 5e-4 --min-lr 5e-5 --warmup 20 --max-steps "$STEPS" "${COMMON_TRAIN[@]}" > "$RUNS/eagle-r$ROUND.log" 2>&1 &
  wait
  "$FS" -v train --kind medusa --medusa-heads 4 --data "$RUNS/data/sd-train" --out "$RUNS/medusa-r$ROUND" \
    --warmup 20 "${MEDUSA[@]}" "${COMMON_TRAIN[@]}"
  ;;
fixed)
  "$FS" -v gen-data --mode fixed --split train --limit 400 --max-len 256 --shard-size 16 --dtype float32 \
    --out "$RUNS/data/fixed-train"
  OMP_NUM_THREADS=1 "$FS" -v train --data "$RUNS/data/fixed-train" --out "$RUNS/fixed-r2" --k 2 --draft-vocab 4096 \
    --vocab-corpus sharegpt --lr 1e-3 --min-lr 1e-4 --warmup 20 --max-steps 400 --eval-data "$RUNS/data/sd-heldout" \
    --max-len 256 --batch-size 4 --eval-every 50 --save-every 50 --log-every 10 --eval-samples 48
  ;;
ship)
  for pair in "falcon-r$ROUND:falcon" "eagle-r$ROUND:eagle" "medusa-r$ROUND:medusa"; do
    run="${pair%%:*}"; kind="${pair##*:}"; src="$RUNS/$run/drafter"; dst="src/falconspec/assets/drafters/smollm2-135m-$kind"
    test -f "$src/recipe.json" || { echo "skip $kind: $src is not finished"; continue; }
    rm -rf "$dst.tmp" && mkdir -p "$dst.tmp" && cp "$src"/{config.json,model.safetensors,recipe.json} "$dst.tmp/"
    rm -rf "$dst" && mv "$dst.tmp" "$dst" && echo "shipped $src -> $dst"
  done
  ;;
*) echo "usage: round2.sh data|train|fixed|ship" >&2; exit 2 ;;
esac
