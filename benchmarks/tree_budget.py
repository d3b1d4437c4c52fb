"""Which tree size pays: speed-up over plain greedy per drafter and tree budget (nodes with the root, depth).

Every configuration answers the same MT-bench first turns in one process, interleaved prompt by prompt, and the
script prints the median and overall speed-up over plain greedy, the mean accepted length (bonus included) and
how many outputs equal greedy's. The trained drafters are the ones shipped for the built-in model unless given.

    python benchmarks/tree_budget.py --first 8 --prompts 10 --max-new-tokens 96 \\
        --falcon 3:2 4:2 4:4 5:4 --eagle 3:2 4:3 5:4 --pld 3 4 5 --lookahead 2:3:1 3:3:2 4:4:2

Lookahead's tree is its window of W x (N-1) nodes plus up to G pool n-grams of N-1 tokens (``--lookahead W:N:G``).
"""

from __future__ import annotations

import argparse
import statistics

from falconspec import SpeculativeGenerator
from falconspec.bench.datasets import load_dataset
from falconspec.drafters import LookaheadDrafter, PromptLookupDrafter, make_drafter
from falconspec.models import load_target


def budgets(values: list[str]) -> list[tuple[int, int | None]]:
    """'NODES:DEPTH' or 'NODES' -> (nodes, depth or None)."""
    out = []
    for value in values:
        nodes, _, depth = value.partition(":")
        out.append((int(nodes), int(depth) if depth else None))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--first", type=int, default=0, help="skip this many MT-bench questions")
    parser.add_argument("--prompts", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=96)
    for kind in ("falcon", "eagle", "medusa"):
        parser.add_argument(f"--{kind}", nargs="*", default=[], metavar="NODES:DEPTH")
        parser.add_argument(f"--{kind}-drafter", default=kind, help="checkpoint directory (default: shipped)")
    parser.add_argument("--pld", nargs="*", default=[], metavar="NODES")
    parser.add_argument("--lookahead", nargs="*", default=[], metavar="W:N:G", help="window, n-gram size, guesses")
    args = parser.parse_args()

    target = load_target(args.model, dtype=args.dtype)
    prompts = load_dataset("mt-bench", args.first + args.prompts, max_turns=1).prompts[args.first:]
    generators = {"greedy": SpeculativeGenerator(target)}
    for kind in ("falcon", "eagle", "medusa"):
        for nodes, depth in budgets(getattr(args, kind)):
            options = {"num_nodes": nodes} | ({"depth": depth} if depth is not None else {})
            drafter = make_drafter(getattr(args, f"{kind}_drafter"), target, **options)
            generators[f"{kind} {nodes}:{depth or '-'}"] = SpeculativeGenerator(target, drafter)
    for nodes, _ in budgets(args.pld):
        generators[f"pld {nodes}"] = SpeculativeGenerator(target, PromptLookupDrafter(num_nodes=nodes))
    for setting in args.lookahead:
        window, ngram, guesses = (int(v) for v in setting.split(":"))
        drafter = LookaheadDrafter(window=window, ngram=ngram, guesses=guesses)
        generators[f"lookahead {setting}"] = SpeculativeGenerator(target, drafter)

    warm_up = [{"role": "user", "content": "Hello!"}]
    for generator in generators.values():
        generator.generate(messages=warm_up, max_new_tokens=8)
    results: dict[str, list] = {name: [] for name in generators}
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt.turns[0]}]
        for name, generator in generators.items():
            out = generator.generate(messages=messages, max_new_tokens=args.max_new_tokens)
            results[name].append(out)
    base = results["greedy"]
    base_rate = sum(len(o.token_ids) for o in base) / sum(o.stats.total_time for o in base)
    print(f"{args.model} {args.dtype}, MT-bench first turns {args.first + 1}-{args.first + len(prompts)}, "
          f"{args.max_new_tokens} new tokens")
    print("| method nodes:depth (lookahead W:N:G) | median speed-up | overall | mean accepted length | identical |")
    print("|---|---|---|---|---|")
    for name, outs in results.items():
        ratios = [(len(o.token_ids) / o.stats.total_time) / (len(b.token_ids) / b.stats.total_time)
                  for o, b in zip(outs, base)]
        overall = sum(len(o.token_ids) for o in outs) / sum(o.stats.total_time for o in outs) / base_rate
        tau = statistics.mean(o.stats.mean_accepted_length for o in outs)
        same = sum(o.token_ids == b.token_ids for o, b in zip(outs, base))
        print(f"| {name} | {statistics.median(ratios):.3f} | {overall:.3f} | {tau:.2f} | {same}/{len(outs)} |")


if __name__ == "__main__":
    main()
