#!/bin/bash
cd "$(dirname "$0")/../.."  # the repository root: every path below is relative to it
# usage: run.sh NAME DATA [extra falconspec train flags...]   (re-run to resume)
export FALCONSPEC_CACHE=/tmp/fscache HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
NAME=$1; DATA=$2; shift 2
R=runs
exec .venv/bin/falconspec -v train --data $R/data/$DATA --eval-data $R/data/sd-heldout --out $R/recipes/$NAME \
  --max-len 256 --batch-size 4 --draft-vocab 4096 --vocab-corpus sharegpt --lr 1e-3 --min-lr 1e-4 --warmup 10 \
  --eval-every 25 --save-every 25 --log-every 5 --eval-samples 16 "$@"
