#!/bin/bash
# Copy a finished run's drafter into the package: ship.sh RUN_DIR KIND   (KIND = falcon | eagle | eagle3 | medusa)
set -euo pipefail
cd "$(dirname "$0")/../.."
SRC=$1/drafter
DST=src/falconspec/assets/drafters/smollm2-135m-$2
test -f "$SRC/recipe.json"
mkdir -p "$DST.tmp" && cp "$SRC/config.json" "$SRC/model.safetensors" "$SRC/recipe.json" "$DST.tmp/"
rm -rf "$DST.old"; if [ -d "$DST" ]; then mv "$DST" "$DST.old"; fi; mv "$DST.tmp" "$DST"; rm -rf "$DST.old"
chmod 644 "$DST"/*; ls -la "$DST"
