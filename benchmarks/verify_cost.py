"""What a verification forward costs: one target forward over n tokens on top of a cached prefix, against n = 1.

Times stock ``F.linear`` and falconspec's few-row path (:mod:`falconspec.kernels`) interleaved round by round,
so machine drift hits both alike, and prints the median milliseconds and the ratio to a stock one-token step.

    python benchmarks/verify_cost.py --model smollm2-135m --dtype float32 --prefix 256 --rounds 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from falconspec.kernels import SmallBatchLinear
from falconspec.models import load_target
from falconspec.tree import Tree


def set_small_batch(model: torch.nn.Module, max_rows: int) -> None:
    """max_rows = 1 sends every product down the stock path."""
    for module in model.modules():
        if isinstance(module, SmallBatchLinear):
            module.max_rows = max_rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prefix", type=int, default=256, help="cached tokens before the verified ones")
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 2, 4, 6, 8, 12, 16, 24, 32])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--max-rows", type=int, default=16, help="few-row path limit while timing it")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    target = load_target(args.model, dtype=args.dtype)
    generator = torch.Generator().manual_seed(0)
    prefix = torch.randint(100, target.vocab_size - 100, (args.prefix,), generator=generator)
    target.prefill(prefix)
    variants = {"F.linear": 1, "weight@x.T": args.max_rows}
    times: dict[tuple[str, int], list[float]] = {(v, n): [] for v in variants for n in args.sizes}
    for round_index in range(args.rounds + 2):  # two warm-up rounds
        for n in args.sizes:
            tree = Tree.chain(int(prefix[-1]), prefix[:n - 1].tolist())
            for variant, max_rows in variants.items():
                set_small_batch(target.model, max_rows)
                start = time.perf_counter()
                target.forward_tree(tree)
                elapsed = time.perf_counter() - start
                target.cache.crop(-n)
                if round_index >= 2:
                    times[(variant, n)].append(elapsed)
    one_step = statistics.median(times[("F.linear", 1)])
    print(f"{args.model} {args.dtype}, {torch.get_num_threads()} threads, {args.prefix} cached tokens, "
          f"median of {args.rounds} rounds: ms (ratio to a stock one-token step)")
    print("| n | " + " | ".join(variants) + " |\n|---|" + "---|" * len(variants))
    for n in args.sizes:
        cells = [f"{statistics.median(times[(v, n)]) * 1e3:.1f} ({statistics.median(times[(v, n)]) / one_step:.2f}x)"
                 for v in variants]
        print(f"| {n} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
