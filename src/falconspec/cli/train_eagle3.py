"""``falconspec train-eagle3``: train an EAGLE-3 drafter with training-time test (see :mod:`falconspec.train_eagle3`).

The target runs teacher-forced over each batch of conversations, so no gen-data step is needed. Re-running the same
command resumes from ``--out``/checkpoint. The drafter lands in ``--out``/drafter, loadable by every falconspec
command and exportable with ``falconspec export --format eagle3|gguf``.
"""

from __future__ import annotations

import argparse
import dataclasses


def register(subparsers) -> None:
    from ..train_eagle3 import Eagle3TrainConfig

    parser = subparsers.add_parser("train-eagle3", help="train an EAGLE-3 drafter (training-time test)",
                                   description=__doc__)
    for field in dataclasses.fields(Eagle3TrainConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.default is dataclasses.MISSING:
            parser.add_argument(flag, required=True)
        else:
            kind = {"int": int, "float": float}.get(str(field.type), str)
            parser.add_argument(flag, type=kind, default=field.default, help="(default: %(default)s)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..train_eagle3 import Eagle3TrainConfig, train

    names = {f.name for f in dataclasses.fields(Eagle3TrainConfig)}
    result = train(Eagle3TrainConfig(**{k: v for k, v in vars(args).items() if k in names}))
    print(f"train-eagle3: drafter saved to {result}")
    return 0
