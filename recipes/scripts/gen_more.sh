#!/bin/bash
cd "$(dirname "$0")/../.."  # the repository root: every path below is relative to it
# grow the self-distilled training set (earlier shards are kept)
export FALCONSPEC_CACHE=/tmp/fscache HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
exec .venv/bin/falconspec -v gen-data --mode self-distilled --split train --limit ${1:-192} --max-len 256 --max-new-tokens 160 --shard-size 16 --dtype float32 --gen-dtype float32 --out runs/data/sd-train
