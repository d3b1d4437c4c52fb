#!/usr/bin/env bash
# Round 4 of the built-in model's drafters (issue 12): fine-tune the shipped round-3 Falcon (k=2) and EAGLE-style
# (k=1) drafters on the committed self-distilled token shards (recipes/data/sharegpt-sd: every turn of each
# conversation answered by the target with its own earlier answers, up to 1,024 tokens), side by side with the
# same data, steps and schedule. The Falcon drafter grows the two k=2 additions (zero at the start, so it begins as
# the shipped one): --newest-pair and --chain-slots. Resumable: re-run a stage to continue it.
#   bash recipes/round4.sh data            # features from the committed token shards (train and held-out)
#   bash recipes/round4.sh train NAME      # one run (names below); run two at once on two cores
#   bash recipes/round4.sh final NAME      # a finished run's drafter on the whole held-out set (339 answers)
#   bash recipes/round4.sh tau NAME        # tau at a fixed 4-node tree, MT-bench 80, both turns, 64 tokens, fp32
#   bash recipes/round4.sh ship NAME KIND  # copy a finished run's drafter to the shipped drafter KIND (falcon|eagle)
# Paths are relative to the repository root; runs/ is git-ignored.
set -euo pipefail
cd "$(dirname "$0")/.."
FS=${FALCONSPEC:-.venv/bin/falconspec}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} HF_HUB_OFFLINE=1
TOKENS=recipes/data/sharegpt-sd
DATA=runs/data/sd4-train
HELDOUT=runs/data/sd4-heldout
EVAL=${EVAL:-runs/data/sd4-heldout-50}  # held-out set of the in-training evaluations (the first 50 sequences)
STEPS=${STEPS:-300}
RUNS=runs/round4
COMMON=(--data $DATA --eval-data $EVAL --max-len 1024 --batch-size 4 --lr 5e-4 --min-lr 5e-5 --warmup 20
        --max-steps $STEPS --eval-every 100 --save-every 100 --log-every 10 --eval-samples 1000 --seed 0)
declare -A RUNS_OF=(
  [falcon-r4]="--k 2 --init-from falcon --newest-pair --chain-slots"
  [falcon-r4-plain]="--k 2 --init-from falcon"  # the same fine-tune without the two additions
  [eagle-r4]="--k 1 --init-from eagle"
)
if [[ "${1:-}" =~ ^(train|final|tau|ship)$ ]]; then
  name=${2:-}; [[ -n "${RUNS_OF[$name]+x}" ]] || { echo "unknown run '$name': ${!RUNS_OF[*]}"; exit 2; }
fi
case "${1:-}" in
  data)
    $FS gen-data --from-tokens $TOKENS --split train --out $DATA
    $FS gen-data --from-tokens $TOKENS --split heldout --out $HELDOUT ;;
  train)
    # shellcheck disable=SC2086
    $FS train "${COMMON[@]}" ${RUNS_OF[$name]} --out $RUNS/$name ;;
  final)  # no training (--max-steps 0): the finished drafter on the whole held-out set (the last --init-from wins)
    # shellcheck disable=SC2086
    $FS train "${COMMON[@]}" --eval-data $HELDOUT ${RUNS_OF[$name]} --init-from $RUNS/$name/drafter --max-steps 0 \
      --out $RUNS/final/$name ;;
  tau)
    k=$(grep -o -- '--k [12]' <<< "${RUNS_OF[$name]}" | cut -d' ' -f2)
    method=$([[ $k == 2 ]] && echo falcon || echo eagle)
    $FS bench --methods greedy $method@4 --$method-drafter $RUNS/$name/drafter --datasets mt-bench --num-prompts 80 \
      --max-new-tokens 64 --threads 1 --no-progress --resume --out $RUNS/$name/tau ;;
  ship)
    kind=${3:?usage: $0 ship NAME falcon|eagle}
    bash recipes/scripts/ship.sh $RUNS/$name "$kind" ;;
  *) echo "usage: $0 data | train NAME | final NAME | tau NAME | ship NAME KIND"; exit 2 ;;
esac
