"""``falconspec train-eagle3``: train an EAGLE-3 drafter with training-time test (see :mod:`falconspec.train_eagle3`)
in the one training loop (:mod:`falconspec.trainer`).

The target runs teacher-forced over each batch of conversations, so no gen-data step is needed. Re-running the same
command resumes from ``--out``/checkpoint. The drafter lands in ``--out``/drafter, loadable by every falconspec
command and exportable with ``falconspec export --format eagle3|gguf``.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    from ..train_eagle3 import Eagle3TrainConfig
    from .common import add_config_flags

    parser = subparsers.add_parser("train-eagle3", help="train an EAGLE-3 drafter (training-time test)",
                                   description=__doc__)
    add_config_flags(parser, Eagle3TrainConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train_eagle3 import Eagle3TrainConfig, train
    from .common import config_from_args

    result = train(config_from_args(Eagle3TrainConfig, args))
    print(f"train-eagle3: drafter saved to {result}")
    return 0
