#!/bin/bash
# Grow the self-distilled token dataset recipes/data/sharegpt-sd: the held-out split first (the first
# $HELDOUT_LIMIT held-out conversations, default 256), then the whole train split. Resumable and growing: re-run it,
# on any machine, to continue (conversations already in manifest.json are skipped, new shards are appended).
# Runs from any clone (paths are relative to the repository). Extra arguments go to both gen-data calls, e.g.
#   recipes/scripts/gen_tokens.sh --max-seconds 3600
# On a shared CPU prefer one thread: OMP_NUM_THREADS=1 (two threads fighting other jobs ran ~4x slower here).
# PROCS=N grows the train split with N processes side by side under torchrun, one thread each: process i answers
# the conversations at positions i, i + N, ... and records its shards under a lock on the manifest, so N free cores
# give ~N times the answers per hour of one.
# TOKEN_DATA=DIR grows another dataset, e.g. answers sampled to the same prompts (no held-out split: the greedy
# dataset's is the held-out set):
#   TOKEN_DATA=recipes/data/sharegpt-sd-t07 HELDOUT_LIMIT=0 PROCS=2 recipes/scripts/gen_tokens.sh --temperature 0.7
set -e
cd "$(dirname "$0")/../.."
FS=${FALCONSPEC:-falconspec}
COMMON=(--mode self-distilled --format tokens --out "${TOKEN_DATA:-recipes/data/sharegpt-sd}" --max-len 1024 --max-new-tokens 256
        --batch-size 32)
# shards of 64 conversations: a shard holds the next 64 to finish, while free batch rows are refilled across shard
# boundaries (--cache reuse), so the size only bounds what a killed run loses (the finished ones not yet written)
if (( ${HELDOUT_LIMIT:-256} > 0 )); then
  $FS gen-data "${COMMON[@]}" --split heldout --limit "${HELDOUT_LIMIT:-256}" --shard-size 64 "$@"
fi
if (( ${PROCS:-1} > 1 )); then
  OMP_NUM_THREADS=1 ${TORCHRUN:-torchrun} --standalone --nproc_per_node "$PROCS" "$(command -v "$FS")" gen-data \
    "${COMMON[@]}" --split train --shard-size 64 "$@"
else
  $FS gen-data "${COMMON[@]}" --split train --shard-size 64 "$@"
fi
