#!/usr/bin/env bash
# Issue 12 part 2: recipe ablations for the k=2 Falcon drafter against the k=1 head, every run from scratch on the
# same data with the same steps, evaluated on the same held-out self-distilled conversations. Stages (resumable):
#   bash recipes/ablate_k2.sh data        # features: ShareGPT's own answers (the paper's "fixed" data) + held-out
#   bash recipes/ablate_k2.sh train NAME  # one run (names below); run two at once on two cores
#   bash recipes/ablate_k2.sh final NAME  # a finished run's drafter on the whole held-out set
#   bash recipes/ablate_k2.sh shipped     # the shipped round-3 drafters on the same held-out set (no training)
#   bash recipes/ablate_k2.sh tau NAME    # tau at fixed 4- and 16-node trees on MT-bench first turns
# Paths are relative to the repository root; runs/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
FS=${FALCONSPEC:-.venv/bin/falconspec}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
DATA=runs/data/fixed-train
HELDOUT=runs/data/sd4-heldout
EVAL=${EVAL:-$HELDOUT}  # held-out set of the in-training evaluations
STEPS=${STEPS:-300}
COMMON=(--data $DATA --eval-data $EVAL --max-len 1024 --batch-size 4 --draft-vocab 4096 --vocab-corpus sharegpt
        --lr 1e-3 --min-lr 1e-4 --warmup 20 --max-steps $STEPS --eval-every 100 --save-every 100 --log-every 10
        --eval-samples 1000 --seed 0)
declare -A RUNS=(
  [k2]="--k 2"                                  # Falcon, the shipped recipe: 1 layer, CSGD
  [k1]="--k 1"                                  # the EAGLE-style head, same everything
  [k2-2layers]="--k 2 --num-layers 2"           # the paper's 2 decoder layers
  [k2-noglance]="--k 2 --no-glance"             # plain token-shift training (the paper's "without CSGD")
  [k2-first]="--k 2 --later-slot-weight 0.5"    # the block's first token weighs 2x its second
  [k2-second]="--k 2 --later-slot-weight 2.0"   # the block's second token weighs 2x its first
  [k2-newest]="--k 2 --newest-pair"             # every block slot also reads the block's newest pair directly
  [k2-ttt]="--k 2 --ttt-blocks 2"               # training-time test: 2 drafted blocks unrolled on own predictions
  [k2-newest-ttt]="--k 2 --newest-pair --ttt-blocks 2"  # both
  [k2-chain]="--k 2 --chain-slots"              # the block's second slot reads the token drafted at its first
  [k2-newest-chain]="--k 2 --newest-pair --chain-slots"  # both
  [k1-long]="--k 1"                             # run with STEPS=600: does the gap at the first token close?
  [k2-newest-chain-long]="--k 2 --newest-pair --chain-slots"  # run with STEPS=600
)
if [[ "${1:-}" =~ ^(train|final|tau)$ ]]; then
  name=${2:-}; [[ -n "${RUNS[$name]+x}" ]] || { echo "unknown run '$name': ${!RUNS[*]}"; exit 2; }
fi
case "${1:-}" in
  data)
    $FS gen-data --mode fixed --split train --limit 832 --max-len 512 --shard-size 64 --dtype float32 --out $DATA
    $FS gen-data --from-tokens recipes/data/sharegpt-sd --split heldout --out $HELDOUT ;;
  train)
    # shellcheck disable=SC2086
    $FS train "${COMMON[@]}" ${RUNS[$name]} --out runs/ablate/$name ;;
  final)  # a finished run's drafter evaluated on the whole held-out set (no training: --max-steps 0)
    # shellcheck disable=SC2086
    $FS train "${COMMON[@]}" --eval-data $HELDOUT ${RUNS[$name]} --init-from runs/ablate/$name/drafter --max-steps 0 \
      --out runs/ablate/final/$name ;;
  shipped)  # the shipped round-3 drafters on the whole held-out set
    for kind in falcon eagle; do
      k=$([[ $kind == falcon ]] && echo 2 || echo 1)
      $FS train "${COMMON[@]}" --eval-data $HELDOUT --k $k --init-from $kind --max-steps 0 \
        --out runs/ablate/final/shipped-$kind
    done ;;
  tau)
    k=$(grep -o -- '--k [12]' <<< "${RUNS[$name]}" | cut -d' ' -f2)
    method=$([[ $k == 2 ]] && echo falcon || echo eagle)
    $FS bench --methods greedy $method@4 $method@16 --$method-drafter runs/ablate/$name/drafter --datasets mt-bench \
      --max-turns 1 --num-prompts 10 --max-new-tokens 64 --threads 1 --no-progress --resume \
      --out runs/ablate/$name/tau ;;
  *) echo "usage: $0 data | train NAME | final NAME | shipped | tau NAME"; exit 2 ;;
esac
