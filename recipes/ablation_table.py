"""Collect the k=2 ablation runs of ``recipes/ablate_k2.sh`` into ``recipes/ablations.json`` and a Markdown table.

Per run: its flags, drafter parameters, the in-training held-out curve (acc@1 / acc@2 by step, on the evaluation set
the runs used), the final drafter on the whole held-out set (``ablate_k2.sh final``: acc@1..4, rollouts, P(depth 2
right | depth 1 right)) and, where ``ablate_k2.sh tau`` ran, the mean accepted length per target forward (bonus
included) at fixed 4- and 16-node trees on MT-bench first turns (the JSON also keeps each run's speed-up over plain
greedy, which means little when the runs shared the cores with training, as they did on 2026-12-01). Runs already in
``--out`` whose directories are gone (runs/ is git-ignored, so a new clone has none) keep their recorded entries.

usage: python recipes/ablation_table.py [--runs runs/ablate] [--out recipes/ablations.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from falconspec.train_common import eval_history


def tau_rows(summary: Path) -> dict:
    if not summary.is_file():
        return {}
    out = {}
    for row in json.loads(summary.read_text())["rows"]:
        if "@" in row["method"] and row["status"] == "ok":
            nodes = row["method"].split("@")[1]
            out[nodes] = {"tau": round(row["mean_accepted_length"], 3), "speedup": round(row["speedup"]["median"], 3),
                          "identical": row["identical_to_greedy"]["rate"], "prompts": row["prompts"]}
    return out


def collect(root: Path) -> dict:
    runs = {}
    for final in sorted(path.parent for path in (root / "final").glob("*/log.jsonl")):
        name = final.name
        last = eval_history(final)[-1]
        recipe = json.loads((final / "drafter" / "recipe.json").read_text())
        accs = [last[f"acc@{d}"] for d in range(1, 5)]
        runs[name] = {
            "config": {key: recipe["config"].get(key) for key in (
                "k", "num_layers", "glance", "later_slot_weight", "newest_pair", "chain_slots", "ttt_blocks",
                "max_steps", "lr", "batch_size", "seed")},
            "init_from": recipe["config"].get("init_from"),
            "parameters": recipe.get("parameters"),
            "final": {"acc": accs, "rollouts": last["rollouts"], "eval_kl": round(last["eval_kl"], 4),
                      "depth2_given_depth1": round(accs[1] / accs[0], 4) if accs[0] else None},
            "curve": [{"step": e["step"], "acc@1": e["acc@1"], "acc@2": e["acc@2"], "rollouts": e["rollouts"]}
                      for e in eval_history(root / name)],
            "tau": tau_rows(root / name / "tau" / "summary.json"),
        }
    return runs


def table(runs: dict) -> str:
    lines = ["| run | k | layers | params | acc@1 | acc@2 | acc@3 | acc@4 | P(d2 \\| d1) | curve acc@1 (every 100 steps) "
             "| τ@4 | τ@16 |", "|" + "---|" * 12]
    for name, r in runs.items():
        c, f = r["config"], r["final"]
        curve = "/".join(f"{e['acc@1']:.3f}" for e in r["curve"]) or "–"
        tau = [f"{r['tau'][n]['tau']:.2f}" if n in r["tau"] else "–" for n in ("4", "16")]
        lines.append(f"| {name} | {c['k']} | {c['num_layers']} | {r['parameters'] / 1e6:.2f}M | "
                     + " | ".join(f"{a:.3f}" for a in f["acc"]) + f" | {f['depth2_given_depth1'] or 0:.2f} | {curve} | "
                     + " | ".join(tau) + " |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", default="runs/ablate")
    parser.add_argument("--out", default=str(Path(__file__).with_name("ablations.json")))
    args = parser.parse_args(argv)
    out = Path(args.out)
    runs = json.loads(out.read_text()) if out.is_file() else {}
    runs.update(collect(Path(args.runs)))
    out.write_text(json.dumps(runs, indent=1) + "\n")
    print(table(runs))
    return runs


if __name__ == "__main__":
    main()
