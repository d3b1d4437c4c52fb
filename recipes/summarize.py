"""Collect the eval history of training runs into recipes/results.json.

usage: python recipes/summarize.py RUN_DIR [RUN_DIR ...]   (each a `falconspec train --out` directory)
"""

import json
import sys
from pathlib import Path


def summarize(run: Path) -> dict:
    records = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    evals = [r["eval"] for r in records if "eval" in r]
    train = [r for r in records if "total" in r]
    recipe_file = run / "drafter" / "recipe.json"
    recipe = json.loads(recipe_file.read_text()) if recipe_file.exists() else {}
    return {
        "run": run.name,
        "command": recipe.get("command"),
        "config": recipe.get("config"),
        "data": recipe.get("data"),
        "train_samples": recipe.get("train_samples"),
        "eval_samples": recipe.get("eval_samples"),
        "parameters": recipe.get("parameters"),
        "finished": recipe_file.exists(),
        "train_loss_first_last": [train[0]["total"], train[-1]["total"]] if train else None,
        "eval": [{key: e[key] for key in ("step", "acc@1", "acc@2", "acc@3", "acc@4", "acc@8", "eval_acc", "eval_ce",
                                          "rollouts") if key in e} for e in evals],
    }


if __name__ == "__main__":
    out = Path(__file__).with_name("results.json")
    results = json.loads(out.read_text()) if out.exists() else {}
    for arg in sys.argv[1:]:
        summary = summarize(Path(arg))
        results[summary["run"]] = summary
    out.write_text(json.dumps(results, indent=1) + "\n")
    for name, r in results.items():
        curve = ", ".join(f"{e['step']}: {e.get('acc@1', 0):.3f}/{e.get('acc@2', 0):.3f}" for e in r["eval"])
        print(f"{name}: acc@1/acc@2 by step  {curve}")
