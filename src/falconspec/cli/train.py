"""``falconspec train``: train a drafter on gen-data shards in the one training loop (:mod:`falconspec.trainer`):
a Falcon SAR drafter (k=2) or an EAGLE-style head (k=1) with CSGD (``--kind sar``), or Medusa heads
(``--kind medusa``).

Two CPU processes: ``torchrun --nproc_per_node 2 --rdzv-backend c10d --rdzv-endpoint localhost:0
$(which falconspec) train ...``; on GPUs ``accelerate launch $(which falconspec) train ...``. Re-running the same
command resumes from ``--out``/checkpoint.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from ..drafters.registry import shard_objectives
    from ..train import TrainConfig
    from .common import add_config_flags

    parser = subparsers.add_parser("train", help="train a drafter on gen-data shards (CSGD, Medusa)",
                                   description=__doc__)
    add_config_flags(parser, TrainConfig, choices={"kind": list(shard_objectives())})
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train import TrainConfig, train
    from .common import config_from_args

    result = train(config_from_args(TrainConfig, args))
    if result is not None:
        print(f"train: drafter saved to {result}")
    return 0
