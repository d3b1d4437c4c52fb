"""``falconspec generate``: stream a speculative generation and end with a one-line stats summary."""

from __future__ import annotations

import argparse
import sys

from .common import add_model_args, add_sampling_args, load_model_and_drafter


def register(subparsers) -> None:
    parser = subparsers.add_parser("generate", help="generate text with speculative decoding",
                                   description=__doc__)
    parser.add_argument("prompt", help="the prompt (a user message with --chat)")
    add_model_args(parser)
    add_sampling_args(parser)
    parser.add_argument("--chat", action="store_true", help="format the prompt with the model's chat template")
    parser.add_argument("--system", default=None, help="system message (with --chat)")
    parser.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..generate import SpeculativeGenerator

    target, drafter = load_model_and_drafter(args)
    request = {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_p": args.top_p,
               "top_k": args.top_k, "seed": args.seed, "stop": args.stop}
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system else []
        request["messages"] = system + [{"role": "user", "content": args.prompt}]
    else:
        request["prompt"] = args.prompt
    for chunk in SpeculativeGenerator(target, drafter).stream(**request):
        sys.stdout.write(chunk.text)
        sys.stdout.flush()
        if chunk.stats is not None:
            sys.stdout.write("\n")
            print(f"[{drafter.name}] finish={chunk.finish_reason} | {chunk.stats.summary()}", file=sys.stderr)
    return 0
