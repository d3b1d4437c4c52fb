"""Collect runs of ``recipes/data_curve.sh`` into one entry of ``recipes/data_curve_mtbench.json`` and a Markdown table.

Per run NAME (a directory of runs/curve, or falcon / eagle / medusa for the shipped drafters, where a stage ran):
- ``heldout``: the drafter on the whole held-out split (``data_curve.sh final NAME``), acc@1..4 and rollouts;
- ``openings``: on the held-out answers' openings only (``data_curve.sh openings NAME``: windows in an answer's
  first 64 tokens);
- ``mtbench``: on the target's own MT-bench answers (``data_curve.sh mtb NAME``);
- ``curve``: acc@1 of the in-training evaluations (first held-out shard, every 100 steps; evaluations without
  rollouts are skipped); ``slot_curve``: the teacher-forced accuracy of a newest-slots drafter's last slot there;
- ``tau``: mean accepted length per target forward, bonus included, at fixed 4- and 16-node trees on MT-bench
  first turns (``data_curve.sh tau NAME``; 10 prompts, 64 tokens), whether every answer equalled greedy, and the
  speed-up (which means little when other jobs shared the cores, as they did).

usage: python recipes/curve_runs.py --key KEY [--note TEXT] [--command TEXT] NAME [NAME ...]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ablation_table import tau_rows  # recipes/ is the script's directory, so on sys.path
from falconspec.train_common import eval_history

ROOT = Path(__file__).resolve().parent.parent
RUNS = ROOT / "runs" / "curve"
OUT = Path(__file__).with_name("data_curve_mtbench.json")
DEPTHS = range(1, 5)


def scores(directory: Path) -> dict | None:
    history = eval_history(directory)
    if not history:
        return None
    last = history[-1]
    found = {f"acc@{d}": last[f"acc@{d}"] for d in DEPTHS if f"acc@{d}" in last}
    # rollouts; teacher-forced accuracy per slot of a newest-slots drafter, and over every position and slot
    for key, name in (("rollouts", "rollouts"), ("slot_acc", "slot_acc"), ("eval_acc", "teacher_forced_acc")):
        if key in last:
            found[name] = round(last[key], 4) if key == "eval_acc" else last[key]
    return found or None


def collect(name: str) -> dict:
    entry = {"heldout": scores(RUNS / "final" / name), "openings": scores(RUNS / "openings" / name),
             "mtbench": scores(RUNS / "mtbench" / name),
             "curve": [round(e["acc@1"], 4) for e in eval_history(RUNS / name) if "acc@1" in e],
             "slot_curve": [e["slot_acc"][-1] for e in eval_history(RUNS / name) if "slot_acc" in e],
             "tau": tau_rows(RUNS / name / "tau" / "summary.json")}
    return {key: value for key, value in entry.items() if value}


def row(name: str, entry: dict) -> str:
    def accs(part: str) -> str:
        found = entry.get(part)
        return " / ".join(f"{found[f'acc@{d}']:.3f}" for d in DEPTHS if f"acc@{d}" in found) if found else "–"

    taus = entry.get("tau", {})
    tau_cell = " / ".join(f"{taus[n]['tau']:.2f}" for n in ("4", "16") if n in taus) or "–"
    curve = "/".join(f"{a:.3f}" for a in entry.get("curve", [])) or "–"
    slots = " / ".join(f"{a:.3f}" for a in entry.get("heldout", {}).get("slot_acc", [])) or "–"
    return f"| {name} | {accs('heldout')} | {slots} | {accs('openings')} | {accs('mtbench')} | {curve} | {tau_cell} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("names", nargs="+")
    parser.add_argument("--key", required=True, help="the entry's key in data_curve_mtbench.json")
    parser.add_argument("--note", default="")
    parser.add_argument("--command", default="")
    args = parser.parse_args()
    data = json.loads(OUT.read_text())
    old = data.get(args.key, {})
    runs = {name: collect(name) or old.get("runs", {}).get(name, {}) for name in args.names}  # runs/ is git-ignored
    data[args.key] = {"note": args.note or old.get("note", ""), "command": args.command or old.get("command", ""),
                      "runs": runs}
    OUT.write_text(json.dumps(data, indent=1) + "\n")
    print("| run | held-out acc@1..4 | held-out slot acc, teacher forced | held-out openings acc@1..4 "
          "| MT-bench answers acc@1..4 | in training acc@1 (every 100 steps) | τ@4 / τ@16 |")
    print("|---|---|---|---|---|---|---|")
    for name, entry in runs.items():
        print(row(name, entry))


if __name__ == "__main__":
    main()
