"""Held-out acceptance against training data size, and the data a log-linear fit says would reach a goal.

The shipped drafters were trained in rounds on growing self-distilled data (round 1: 506 samples, round 2: 1,225,
round 3: 3,710; each round fine-tuned the last), so the final held-out evaluation of each round's run in
``recipes/results.json`` is a learning curve against data size. Fit acc@d = a + b * log2(samples) per drafter and
solve for the goal (issue 12: acc@1 >= 0.60 and acc@2 >= 0.35). Three points, rounds that also differ in steps and
learning rate, 31 held-out samples (+-0.03): an order of magnitude, not a promise.

``--curve runs/curve`` reads the controlled curve of ``recipes/data_curve.sh`` instead: the same drafter trained from
scratch with the same flags, steps and seed on the first N self-distilled token shards, each scored on the whole
held-out set (339 answers); x is then the answer tokens of those shards (from the token manifest).

usage: python recipes/learning_curve.py [--results recipes/results.json] [--out FILE]
       python recipes/learning_curve.py --curve runs/curve [--out recipes/data_curve.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROUNDS = {"falcon": ["final-k2", "falcon-r2", "falcon-r3"], "eagle": ["final-k1", "eagle-r2", "eagle-r3"]}
GOALS = {"acc@1": 0.60, "acc@2": 0.35}


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least squares y = a + b * log2(x)."""
    b, a = np.polyfit(np.log2([x for x, _ in points]), [y for _, y in points], 1)
    return float(a), float(b)


def slope_and_goal(points: list[tuple[float, float]], goal: float) -> tuple[float, float | None]:
    """The fitted gain per doubling of x, and the x at which the fit reaches ``goal`` (None when it does not rise)."""
    a, b = fit(points)
    return b, (2 ** ((goal - a) / b) if b > 0 else None)


def goal_entry(points: list[tuple[float, float]], goal: float) -> dict:
    """The fit of ``points`` as a report entry: values, gain per doubling, and x at the goal (2 significant digits)."""
    b, needed = slope_and_goal(points, goal)
    return {"values": [y for _, y in points], "per_doubling": round(b, 4), "goal": goal,
            "x_for_goal": None if needed is None else float(f"{needed:.2g}")}


def data_curve(root: Path, manifest: Path) -> dict:
    """Runs ``<drafter>-<shards>`` of ``recipes/data_curve.sh`` (final held-out evaluations under root/final):
    acc@1..4 by training answer tokens, and the fit per drafter with at least two sizes."""
    from falconspec.train_common import eval_history

    train = sorted((s for s in json.loads(manifest.read_text())["shards"] if s["split"] == "train"),
                   key=lambda s: s["index"])
    runs: dict[str, list] = {}
    for final in sorted(root.glob("final/*/log.jsonl")):
        drafter, _, shards = final.parent.name.rpartition("-")
        if not shards.isdigit():
            continue  # a variant (e.g. falcon-15-dist1): reported by its own row, not on the curve
        last = eval_history(final.parent)[-1]
        tokens = sum(s["answer_tokens"] for s in train[: int(shards)])
        runs.setdefault(drafter, []).append({"shards": int(shards), "answer_tokens": tokens,
                                             "acc": [last[f"acc@{d}"] for d in range(1, 5)],
                                             "rollouts": last["rollouts"]})
    report = {}
    for drafter, points in runs.items():
        points.sort(key=lambda p: p["answer_tokens"])
        entry = {"points": points}
        if len(points) >= 2:
            for d, metric in enumerate(GOALS, start=1):
                entry[metric] = goal_entry([(p["answer_tokens"], p["acc"][d - 1]) for p in points], GOALS[metric])
                print(f"{drafter} {metric}: {entry[metric]['values']} at {[p['answer_tokens'] for p in points]} "
                      f"answer tokens; {entry[metric]['per_doubling']:+.3f} per doubling; {GOALS[metric]} at "
                      f"~{entry[metric]['x_for_goal']} answer tokens")
        report[drafter] = entry
    return report


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(Path(__file__).with_name("results.json")))
    parser.add_argument("--curve", default="", help="runs directory of recipes/data_curve.sh")
    parser.add_argument("--manifest", default=str(Path(__file__).with_name("data") / "sharegpt-sd" / "manifest.json"))
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    if args.curve:
        report = data_curve(Path(args.curve), Path(args.manifest))
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
        return report
    runs = json.loads(Path(args.results).read_text())
    report = {}
    for drafter, names in ROUNDS.items():
        entry = {"runs": names, "samples": [runs[n]["train_samples"] for n in names]}
        for metric, goal in GOALS.items():
            points = [(runs[n]["train_samples"], runs[n]["eval"][-1][metric]) for n in names]
            b, needed = slope_and_goal(points, goal)
            entry[metric] = {"values": [y for _, y in points], "per_doubling": round(b, 4), "goal": goal,
                             "samples_for_goal": None if needed is None else int(round(needed, -2))}
            print(f"{drafter} {metric}: {[y for _, y in points]} at {entry['samples']} samples; "
                  f"+{b:.3f} per doubling; {goal} at ~{entry[metric]['samples_for_goal']:,} samples")
        report[drafter] = entry
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1) + "\n")
    return report


if __name__ == "__main__":
    main()
