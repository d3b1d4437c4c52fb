"""``falconspec train``: train a Falcon SAR drafter (k=2) or an EAGLE-style head (k=1) with CSGD.

Two CPU processes: ``torchrun --nproc_per_node 2 --rdzv-backend c10d --rdzv-endpoint localhost:0
$(which falconspec) train ...``; on GPUs ``accelerate launch $(which falconspec) train ...``. Re-running the same
command resumes from ``--out``/checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses


def register(subparsers) -> None:
    from ..train import TrainConfig

    parser = subparsers.add_parser("train", help="train a drafter on gen-data shards (CSGD)", description=__doc__)
    parser.add_argument("--data", required=True, help="gen-data directory (training split)")
    parser.add_argument("--out", required=True, help="run directory: checkpoint/, drafter/, log.jsonl")
    for field in dataclasses.fields(TrainConfig):
        if field.name in ("data", "out"):
            continue
        flag = "--" + field.name.replace("_", "-")
        if field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default,
                                help=field.metadata.get("help"))
        else:
            kind = {"int": int, "float": float}.get(str(field.type).split(" ")[0], str)
            parser.add_argument(flag, type=kind, default=field.default,
                                help=(field.metadata.get("help", "") + " (default: %(default)s)").strip())
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train import TrainConfig, train

    names = {f.name for f in dataclasses.fields(TrainConfig)}
    cfg = TrainConfig(**{k: v for k, v in vars(args).items() if k in names})
    result = train(cfg)
    if result is not None:
        print(f"train: drafter saved to {result}")
    return 0
