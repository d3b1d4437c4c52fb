#!/bin/bash
# Commit the token shards of recipes/data/sharegpt-sd that its manifest lists, with that manifest, while a
# generation run may still be writing: the manifest is snapshotted first and only the shards it lists are staged,
# so the commit is always consistent (a shard is written before the manifest records it).
# usage: recipes/scripts/commit_tokens.sh [MESSAGE]
set -e
cd "$(dirname "$0")/../.."
D=${TOKEN_DATA:-recipes/data/sharegpt-sd}
SNAP=$(mktemp)
cp "$D/manifest.json" "$SNAP"
PY=${PYTHON:-python3}
mapfile -t FILES < <($PY -c 'import json,sys; m=json.load(open(sys.argv[1])); [print(sys.argv[2] + "/" + s["file"]) for s in m["shards"]]' "$SNAP" "$D")
git add -- "${FILES[@]}"
BLOB=$(git hash-object -w "$SNAP")
git update-index --add --cacheinfo 100644,"$BLOB","$D/manifest.json"
SUMMARY=$($PY -c 'import json,sys; t=json.load(open(sys.argv[1]))["totals"]; print("; ".join("%s: %d shards, %d answers, %d answer tokens" % (k, v["shards"], v["answers"], v["answer_tokens"]) for k, v in t.items()))' "$SNAP")
rm -f "$SNAP"
git commit -q -m "${1:-Token data: $SUMMARY}"   # the index: the snapshot, not the working-tree manifest
git log --oneline -1
