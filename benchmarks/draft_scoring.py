"""What scoring a drafting pass's branches together saves: the shipped falcon's ``SARDrafter.propose`` timed at
depths 1-6 with the drafter's own scoring (every branch of a pass in one head product per block slot, and a block the
depth cuts scoring only its first slot) against branch-by-branch scoring of every slot (how falcon drafted before
commit 663d41f, emulated by growing one branch at a time), with the shipped eagle head as the reference. Variants
are interleaved on each prompt (MT-bench first turns, the drafter's cache holding the prompt); milliseconds per
proposal, median over prompts of each prompt's median, with the quartiles over prompts.

    python benchmarks/draft_scoring.py [--prompts 20] [--repeats 5] [--nodes 16] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from falconspec.bench.datasets import load_dataset
from falconspec.calibrate import fingerprint
from falconspec.drafters import make_drafter
from falconspec.models import load_target

DEPTHS = (1, 2, 3, 4, 6)


def branch_by_branch(drafter):
    """``drafter._grow`` as it was: each branch of a pass grown alone, every slot of its block scored."""
    grow = type(drafter)._grow

    def grow_alone(builder, branches, outputs, m, depth_left):
        return [n for branch in branches for n in grow(drafter, builder, [branch], outputs, m, drafter.k)]

    return grow_alone


def quartiles(values: list[float]) -> list[float]:
    q = statistics.quantiles(values, n=4) if len(values) > 1 else values * 3
    return [round(q[0], 2), round(statistics.median(values), 2), round(q[-1], 2)]


@torch.no_grad()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--prompts", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5, help="proposals per variant, depth and prompt")
    parser.add_argument("--nodes", type=int, default=16, help="tree size with the root (dynamic policy)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    target = load_target("smollm2-135m")
    falcon = make_drafter("falcon", target, num_nodes=args.nodes, depth=max(DEPTHS))
    eagle = make_drafter("eagle", target, num_nodes=args.nodes, depth=max(DEPTHS))
    old = branch_by_branch(falcon)

    def with_old_scoring(ids, depth):
        falcon._grow = old
        try:
            return falcon.propose(ids, depth)
        finally:
            del falcon._grow

    variants = {"falcon": falcon.propose, "falcon, branch by branch": with_old_scoring, "eagle": eagle.propose}
    times = {name: {d: [] for d in DEPTHS} for name in variants}
    for prompt in load_dataset("mt-bench", args.prompts, max_turns=1).prompts:
        ids = target.encode(messages=[{"role": "user", "content": prompt.turns[0]}])
        ids = torch.as_tensor(ids).reshape(-1)
        hidden = target.prefill(ids[:-1])
        falcon.begin(ids, hidden)
        eagle.begin(ids, hidden)
        for depth in DEPTHS:
            seen = {name: [] for name in variants}
            for _ in range(args.repeats + 1):  # the first round warms up
                for name, propose in variants.items():
                    start = time.perf_counter()
                    propose(ids, depth)
                    seen[name].append((time.perf_counter() - start) * 1e3)
            for name, ms in seen.items():
                times[name][depth].append(statistics.median(ms[1:]))
    report = {"machine": fingerprint(target), "threads": torch.get_num_threads(), "prompts": args.prompts,
              "repeats": args.repeats, "nodes": args.nodes,
              "ms_per_proposal": {name: {d: quartiles(v) for d, v in by.items()} for name, by in times.items()}}
    print(f"ms per proposal, median over {args.prompts} prompts [quartiles], {args.nodes}-node trees, "
          f"{torch.get_num_threads()} threads")
    print(f"{'depth':<26}" + "".join(f"{d:>20}" for d in DEPTHS))
    for name, by in report["ms_per_proposal"].items():
        print(f"{name:<26}" + "".join(f"{f'{q[1]:.1f} [{q[0]:.1f}, {q[2]:.1f}]':>20}" for q in by.values()))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)


if __name__ == "__main__":
    main()
