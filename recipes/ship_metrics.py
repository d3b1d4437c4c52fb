"""Write a shipped drafter's measured figures into its recipe.json, from the ``recipes/data_curve.sh`` run it came from.

After ``bash recipes/scripts/ship.sh runs/curve/RUN/.. KIND`` (and the run's ``final``, ``mtb`` and ``tau`` stages),
this fills ``metrics`` of ``src/falconspec/assets/drafters/smollm2-135m-KIND/recipe.json``:
- ``heldout_339_answers``: acc@1..8 on the token set's whole held-out split (``data_curve.sh final RUN``);
- ``mtbench80_answers``: the same on the target's own MT-bench answers (``data_curve.sh mtb RUN``);
- ``tau_mtbench_first_turns_10``: τ with bonus at the fixed trees of ``data_curve.sh tau RUN``, and whether every
  answer equalled greedy;
- ``machine``: where they were measured;
- ``before_roundN_for_comparison``: the drafter shipped before it, as its own recipe.json recorded it; or, with
  ``--before RUN0``, as that run's stages score it now (after a change of the scoring, when the figures recorded
  then are no longer comparable); ``--before keep`` leaves the block as it is.
It refuses a run whose drafter is not the shipped one (weights compared byte for byte).

usage: python recipes/ship_metrics.py KIND RUN --round N --note TEXT [--before RUN0|keep]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
from pathlib import Path

import torch

from ablation_table import tau_rows  # recipes/ is the script's directory, so on sys.path
from falconspec.calibrate import cpu_info
from falconspec.train_common import eval_history

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "curve"
DEPTHS = range(1, 9)


def accuracies(directory: Path) -> dict:
    history = eval_history(directory)
    if not history:
        raise SystemExit(f"{directory}: no evaluation (run its data_curve.sh stage first)")
    last = history[-1]
    return {**{f"acc@{d}": round(last[f"acc@{d}"], 4) for d in DEPTHS if f"acc@{d}" in last},
            "rollouts": last["rollouts"]}


def figures(run: str) -> dict:
    """A run's held-out and MT-bench-answer accuracies and fixed-tree τ, as its data_curve.sh stages measured them."""
    taus = {nodes: {key: row[key] for key in ("tau", "identical", "prompts")}
            for nodes, row in tau_rows(RUNS / run / "tau" / "summary.json").items()}
    return {"heldout_339_answers": accuracies(RUNS / "final" / run),
            "mtbench80_answers": accuracies(RUNS / "mtbench" / run), "tau_mtbench_first_turns_10": taus,
            "machine": machine()}


def machine() -> str:
    name, flags = cpu_info()
    return f"{os.cpu_count()}-core {name} ({' '.join(flags) or 'no listed flags'}), torch {torch.__version__}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", help="falcon, eagle, ... (src/falconspec/assets/drafters/smollm2-135m-KIND)")
    parser.add_argument("run", help="the data_curve.sh run it was shipped from (a directory of runs/curve)")
    parser.add_argument("--round", type=int, required=True, help="the round this drafter ships in")
    parser.add_argument("--note", required=True, help="what the drafter is, in words (recipe.json's 'note')")
    parser.add_argument("--before", default="", help="the run the drafter shipped before came from, scored by "
                                                     "today's stages (default: its recipe.json at HEAD); 'keep': "
                                                     "leave the recorded block")
    args = parser.parse_args()
    shipped = ROOT / "src" / "falconspec" / "assets" / "drafters" / f"smollm2-135m-{args.kind}"
    run = RUNS / args.run
    if (shipped / "model.safetensors").read_bytes() != (run / "drafter" / "model.safetensors").read_bytes():
        raise SystemExit(f"{shipped} is not {run}/drafter: ship it first (recipes/scripts/ship.sh)")
    recipe = json.loads((shipped / "recipe.json").read_text())
    path = f"src/falconspec/assets/drafters/smollm2-135m-{args.kind}/recipe.json"
    before_key = f"before_round{args.round}_for_comparison"
    if args.before == "keep":
        before = recipe.get("metrics", {}).get(before_key, {})
    elif args.before:
        before = figures(args.before)
    else:
        before = json.loads(subprocess.run(["git", "show", f"HEAD:{path}"], cwd=ROOT, check=True, capture_output=True,
                                           text=True).stdout).get("metrics", {})
    recipe["metrics"] = {**figures(args.run),
                         before_key: {key: value for key, value in before.items() if not key.startswith("before_")}}
    recipe["note"] = args.note
    (shipped / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    print(json.dumps(recipe["metrics"], indent=1))


if __name__ == "__main__":
    main()
