#!/bin/bash
cd "$(dirname "$0")/../.."  # the repository root: every path below is relative to it
# grow the self-distilled training set with two processes (each takes every 2nd shard), then the held-out set
export FALCONSPEC_CACHE=/tmp/fscache HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
FS=.venv/bin/falconspec
D=runs/data
.venv/bin/torchrun --nproc_per_node 2 --rdzv-backend c10d --rdzv-endpoint localhost:0 $FS -v gen-data \
  --mode self-distilled --split train --limit ${1:-352} --max-len 256 --max-new-tokens 160 --shard-size 16 \
  --dtype float32 --gen-dtype float32 --out $D/sd-train
$FS -v gen-data --mode self-distilled --split heldout --limit 48 --max-len 256 --max-new-tokens 160 --shard-size 16 \
  --dtype float32 --gen-dtype float32 --out $D/sd-heldout
