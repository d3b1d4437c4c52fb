"""Held-out acceptance against training data size, and the data a log-linear fit says would reach a goal.

The shipped drafters were trained in rounds on growing self-distilled data (round 1: 506 samples, round 2: 1,225,
round 3: 3,710; each round fine-tuned the last), so the final held-out evaluation of each round's run in
``recipes/results.json`` is a learning curve against data size. Fit acc@d = a + b * log2(samples) per drafter and
solve for the goal (issue 12: acc@1 >= 0.60 and acc@2 >= 0.35). Three points, rounds that also differ in steps and
learning rate, 31 held-out samples (+-0.03): an order of magnitude, not a promise.

usage: python recipes/learning_curve.py [--results recipes/results.json] [--out FILE]
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


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=str(Path(__file__).with_name("results.json")))
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    runs = json.loads(Path(args.results).read_text())
    report = {}
    for drafter, names in ROUNDS.items():
        entry = {"runs": names, "samples": [runs[n]["train_samples"] for n in names]}
        for metric, goal in GOALS.items():
            points = [(runs[n]["train_samples"], runs[n]["eval"][-1][metric]) for n in names]
            a, b = fit(points)
            needed = 2 ** ((goal - a) / b) if b > 0 else None
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
