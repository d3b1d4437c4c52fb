"""Why the k=2 Falcon drafter does or does not beat the k=1 head on a machine: a chain cost model from measured figures.

For a drafter with held-out chain accuracies acc@1..D (``falconspec train`` evaluations: the share of rollouts whose
first d drafted tokens all match the target's greedy tokens) drafting a single chain of d tokens per cycle:

    tokens per cycle   tau(d) = 1 + acc@1 + ... + acc@d            (the bonus token included)
    seconds per cycle  T(d)   = c(d + 1) + passes(d) * p           (c: verification forward over d + 1 nodes)
    speed-up           S(d)   = tau(d) * c(1) / T(d)               (against plain decoding, one token per c(1))

with passes(d) = ceil(d / k) and p the drafter's cost per pass, both from a ``falconspec calibrate`` file of the
machine (its verification curve, the faster product path per n; the drafter's measured seconds per drafting depth).
The chain is the simplest tree; the planner's trees do better than chains when acceptance is spread over ranks, but
the comparison between drafters (same tree shape, same machine) is what this is for.

Each is computed twice: on the machine's measured verification curve, and on a flat one (verifying up to 32 nodes
costs one step: a memory-bound target, as on a GPU). For each it reports the break-even: the cost of a drafter pass,
as a share of a plain step, from which the k=2 drafter's best speed-up is at least the k=1 head's. Halving the passes
pays only when a pass is a sizeable share of a step: more so for a large target on a GPU than for a 135M target on a
CPU.

usage: python recipes/k2_cost_model.py --calibration CAL.json --drafter falcon=RUN_OR_JSON:2 \
           --drafter eagle=RUN_OR_JSON:1 [--out results.json]
RUN_OR_JSON: a ``falconspec train`` run directory (its last held-out evaluation in ``log.jsonl``) or a JSON file with
``{"acc@1": .., "acc@2": .., ...}``; the suffix is k. The drafter's pass cost comes from the calibration entry whose
name matches (``falcon``, ``eagle``), or ``--pass-ms NAME=MS``.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from falconspec.calibrate import FORMAT, Calibration
from falconspec.kernels import STOCK
from falconspec.planner import interpolate
from falconspec.train_common import eval_history


def accuracies(source: str) -> list[float]:
    path = Path(source)
    record = eval_history(path)[-1] if path.is_dir() else json.loads(path.read_text())
    accs, d = [], 1
    while f"acc@{d}" in record:
        accs.append(float(record[f"acc@{d}"]))
        d += 1
    if not accs:
        raise ValueError(f"{source}: no acc@1.. figures")
    return accs


def verify_curve(calibration: dict) -> dict[int, float]:
    """n -> seconds of one verification forward over n nodes, with the product path the engine would use per n."""
    if calibration.get("format") == 1:  # format 1 timed one node on the stock path alone, under both names
        seconds = {path: [math.inf, *times[1:]] if path != STOCK else times
                   for path, times in calibration["verify"]["seconds"].items()}
        calibration = {**calibration, "format": FORMAT, "verify": {**calibration["verify"], "seconds": seconds}}
    elif calibration.get("format") == 2:  # format 2 did not time the oneDNN path: its curve is the other two's
        calibration = {**calibration, "format": FORMAT}
    measured = Calibration(calibration)
    return dict(zip(measured.sizes, measured.verify_curve()))


def pass_seconds(calibration: dict, name: str, k: int) -> float:
    """The drafter's mean cost per pass: its measured seconds per drafting depth over the passes each depth takes."""
    entries = [e for e in calibration["drafters"].values() if e.get("name") == name]
    if not entries:
        raise ValueError(f"the calibration has no drafter named {name!r}: pass --pass-ms {name}=MS")
    entry = entries[0]
    per_pass = [s / math.ceil(d / k) for d, s in zip(entry["depths"], entry["draft_seconds"])]
    return sum(per_pass) / len(per_pass)


def chain_model(accs: list[float], k: int, curve: dict[int, float], pass_cost: float) -> list[dict]:
    plain, verify = curve[min(curve)], interpolate(list(curve), list(curve.values()))
    rows = []
    for d in range(0, len(accs) + 1):
        if d + 1 > max(curve):  # no extrapolation beyond the measured sizes
            break
        tau = 1 + sum(accs[:d])
        seconds = verify(d + 1) + math.ceil(d / k) * pass_cost
        rows.append({"depth": d, "tau": round(tau, 4), "cycle_ms": round(seconds * 1000, 2),
                     "speedup": round(tau * plain / seconds, 4)})
    return rows


def best(rows: list[dict]) -> dict:
    return max(rows, key=lambda r: r["speedup"])


def break_even(a: tuple, b: tuple, curve: dict[int, float]) -> float | None:
    """The pass cost, as a share of one plain step c(1), from which drafter a's best speed-up is at least b's when
    both drafters' passes cost that much (a log grid from 0.1% to 100%); None if a never catches up there."""
    plain = curve[min(curve)]
    for i in range(61):
        share = 10 ** (-3 + i * 0.05)
        best_a = best(chain_model(a[0], a[1], curve, share * plain))
        best_b = best(chain_model(b[0], b[1], curve, share * plain))
        if best_a["speedup"] >= best_b["speedup"] and best_b["depth"] > 0:
            return round(share, 4)
    return None


def flat_curve(curve: dict[int, float], largest: int = 32) -> dict[int, float]:
    """A machine where verifying up to ``largest`` nodes costs one step (a memory-bound target, as on a GPU)."""
    return {n: curve[min(curve)] for n in (1, largest)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calibration", required=True)
    parser.add_argument("--drafter", action="append", required=True, help="NAME=RUN_OR_JSON:K")
    parser.add_argument("--pass-ms", action="append", default=[], help="NAME=MS: a drafter pass's cost")
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    calibration = json.loads(Path(args.calibration).read_text())
    curve = verify_curve(calibration)
    given = {name: float(ms) / 1000 for name, ms in (item.split("=", 1) for item in args.pass_ms)}
    drafters = {}
    for item in args.drafter:
        name, rest = item.split("=", 1)
        source, k = rest.rsplit(":", 1)
        cost = given.get(name) or pass_seconds(calibration, name.split("-")[0], int(k))
        drafters[name] = (accuracies(source), int(k), cost, source)
    result = {"calibration": args.calibration, "fingerprint": calibration.get("fingerprint"), "curves": {}}
    names = list(drafters)
    for label, c in (("measured", curve), ("flat", flat_curve(curve))):
        entry = {"verify_ms": {n: round(sec * 1000, 2) for n, sec in c.items()}, "drafters": {}}
        for name, (accs, k, cost, source) in drafters.items():
            rows = chain_model(accs, k, c, cost)
            entry["drafters"][name] = {"source": source, "k": k, "pass_ms": round(cost * 1000, 2),
                                       "pass_share": round(cost / c[min(c)], 4), "acc": accs,
                                       "conditional": [round(accs[0], 4)] + [round(accs[d] / accs[d - 1], 4)
                                                                             if accs[d - 1] else 0.0
                                                                             for d in range(1, len(accs))],
                                       "chain": rows, "best": best(rows)}
        if len(names) == 2:
            entry["break_even_pass_share"] = break_even(drafters[names[0]][:3], drafters[names[1]][:3], c)
        result["curves"][label] = entry
        print(f"{label} verification curve, ms by nodes: {entry['verify_ms']}")
        for name, r in entry["drafters"].items():
            b = r["best"]
            print(f"  {name} (k={r['k']}, pass {r['pass_ms']} ms = {r['pass_share']:.1%} of a step): acc "
                  f"{[round(a, 3) for a in r['acc'][:4]]}, P(depth d right | d-1 right) {r['conditional'][:4]}; "
                  f"best chain depth {b['depth']}: tau {b['tau']}, predicted {b['speedup']}x")
        if len(names) == 2:
            share = entry["break_even_pass_share"]
            print(f"  {names[0]} at least as fast as {names[1]} once a drafter pass costs "
                  + (f">= {share:.1%} of a plain step" if share is not None else "(never, up to 100% of a step)"))
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
