"""``falconspec generate``: stream a speculative generation and end with a one-line stats summary.

With ``--explain`` it also prints how the tree budget was chosen (machine fingerprint, the measured verification
cost curve, the planned budget and how it moved) and colours each token by how it was produced: the target's own
token (bonus or plain step) in the default colour, accepted drafts by depth.
"""

from __future__ import annotations

import argparse
import sys

from .common import add_model_args, add_sampling_args, load_model_and_drafter

# ANSI colours of accepted drafts at depth 1, 2, 3, 4+ (depth 0, the target's own token, stays plain)
DEPTH_COLOURS = ("\x1b[32m", "\x1b[36m", "\x1b[34m", "\x1b[35m")
RESET = "\x1b[0m"


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text with speculative decoding",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("prompt", help="the prompt (a user message with --chat)")
    add_model_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--chat", action="store_true", help="format the prompt with the model's chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.add_argument("--explain", action="store_true",
                        help="show the machine's cost curve and the planned budget, and colour tokens by draft depth")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..generate import SpeculativeGenerator
    from ..request import check_request

    request = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "top_k": args.top_k, "seed": args.seed, "stop": args.stop}
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        request["messages"] = system + [{"role": "user", "content": args.prompt}]
    else:
        request["prompt"] = args.prompt
    check_request(**request)  # the library's own checks, before loading the model (ValueError: exit 2)
    target, drafter = load_model_and_drafter(args)
    generator = SpeculativeGenerator(target, drafter, matmul_path=args.matmul_path)
    if args.explain:
        explain_setup(generator, args.matmul_path)
    for chunk in generator.stream(**request):
        sys.stdout.write(coloured(chunk, target.tokenizer) if args.explain else chunk.text)
        sys.stdout.flush()
        if chunk.stats is not None:
            sys.stdout.write("\n")
            print(f"[{drafter.name}] finish={chunk.finish_reason} | {chunk.stats.summary()}", file=sys.stderr)
            if args.explain:
                explain_result(generator, chunk.stats)
    return 0


def explain_setup(generator, matmul_path: str) -> None:
    out = sys.stderr
    if generator.calibration is not None:
        print(generator.calibration.describe(matmul_path), file=out)
    if generator.planner is None:
        drafter = generator.drafter
        why = "no drafter" if drafter.name == "none" else f"a fixed budget: {drafter.num_nodes} nodes, depth {drafter.depth}"
        print(f"plan: {why} (no planner)", file=out)
    else:
        print(f"first plan: {generator.planner.best_plan().describe()}", file=out)
    legend = " ".join(f"{c}depth {d + 1}{'+' if d == 3 else ''}{RESET}" for d, c in enumerate(DEPTH_COLOURS))
    print(f"tokens: target's own (bonus or plain step) | accepted drafts at {legend}", file=out)


def explain_result(generator, stats) -> None:
    out = sys.stderr
    if generator.planner is None:
        return
    for change in stats.plans:
        shape = "plain decoding" if change["num_nodes"] == 1 else f"{change['num_nodes']} nodes, depth {change['depth']}"
        print(f"  cycle {change['cycle']:>3}: {shape} (expected {change['expected_tokens']:.2f} tokens/forward)",
              file=out)
    if stats.fell_back:
        print("  the planner expected no tree to beat plain decoding here and decoded plainly", file=out)


def coloured(chunk, tokenizer) -> str:
    """The chunk's text with each token coloured by the draft depth that proposed it."""
    if not chunk.token_depths or len(chunk.token_depths) != len(chunk.token_ids):
        return chunk.text
    pieces = []
    for token, depth in zip(chunk.token_ids, chunk.token_depths):
        text = tokenizer.decode([token], skip_special_tokens=True)
        pieces.append(text if depth == 0 else f"{DEPTH_COLOURS[min(depth, len(DEPTH_COLOURS)) - 1]}{text}{RESET}")
    return "".join(pieces)
