#!/bin/bash
# the shipped drafters: k=2 (Falcon SAR, CSGD) and k=1 (EAGLE-style head), same data and settings
cd /work/main/runs/recipes
nohup ./run.sh final-k2 sd-train --max-steps ${1:-600} --eval-every 50 --save-every 50 --eval-samples 48 > final-k2.log 2>&1 &
nohup ./run.sh final-k1 sd-train --max-steps ${1:-600} --eval-every 50 --save-every 50 --eval-samples 48 --k 1 > final-k1.log 2>&1 &
wait
