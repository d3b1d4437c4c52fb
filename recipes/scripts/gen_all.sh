#!/bin/bash
cd "$(dirname "$0")/../.."  # the repository root: every path below is relative to it
# drafter training data for the recipes (resumable: re-run this script). fp32: this CPU has no native bf16.
export FALCONSPEC_CACHE=/tmp/fscache HF_HUB_OFFLINE=1 OMP_NUM_THREADS=1
FS=.venv/bin/falconspec
D=runs/data
set -e
$FS -v gen-data --mode self-distilled --split heldout --limit 16 --max-len 256 --max-new-tokens 160 --shard-size 16 --dtype float32 --gen-dtype float32 --out $D/sd-heldout
$FS -v gen-data --mode fixed --split train --limit 96 --max-len 256 --shard-size 16 --dtype float32 --out $D/fixed-train
$FS -v gen-data --mode self-distilled --split train --limit 96 --max-len 256 --max-new-tokens 160 --shard-size 16 --dtype float32 --gen-dtype float32 --out $D/sd-train
