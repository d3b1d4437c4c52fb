"""Does a drafter fit its training sequences better than held-out ones? Scores one drafter, in float32 and by
exactly the code of ``falconspec train``'s evaluation (teacher-forced loss and accuracy, rollout acc@1..8 on the
same seeded windows), on the token set's held-out split and on as many sequences of its train split, taken from
the train shards the drafter's rounds read most (the first ones) or from its last ones. A gap that grows with the
passes over the same data is memorisation: the drafter is short of fresh data, not of steps or capacity.

usage: python recipes/fit_gap.py --drafter falcon|eagle|DIR [--flags "--k 2 --newest-pair --chain-slots"]
                                 [--train-from first|last] [--out runs/fit_gap/NAME.json]
"""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

import torch

DATA = Path(__file__).with_name("data") / "sharegpt-sd"
KIND_FLAGS = {"falcon": "--k 2 --newest-pair --chain-slots", "eagle": "--k 1"}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", required=True, help="shipped drafter name (falcon, eagle) or drafter directory")
    parser.add_argument("--flags", default=None, help="falconspec train flags of the drafter's shape (default: the "
                                                      "shipped kind's)")
    parser.add_argument("--train-from", default="first", choices=("first", "last"),
                        help="which end of the train split the scored train sequences come from")
    parser.add_argument("--out", default=None, help="write the result as JSON here too")
    args = parser.parse_args(argv)
    from falconspec.cli.common import add_config_flags, config_from_args
    from falconspec.train import SARObjective, TrainConfig, evaluate

    flags = args.flags if args.flags is not None else KIND_FLAGS.get(args.drafter, "")
    config_parser = argparse.ArgumentParser()
    add_config_flags(config_parser, TrainConfig)
    cfg = config_from_args(TrainConfig, config_parser.parse_args(
        ["--data", str(DATA), "--eval-data", str(DATA), "--init-from", args.drafter, "--max-steps", "0",
         "--max-len", "1024", "--batch-size", "4", "--eval-samples", "1000", "--dtype", "float32", "--out",
         "runs/fit_gap/unused", *shlex.split(flags)]))
    objective = SARObjective(cfg)
    torch.manual_seed(0)
    model = objective.setup(torch.device("cpu"), None).eval()
    held = objective.eval_samples
    n, train = len(held), objective.train_samples
    picked = range(n) if args.train_from == "first" else range(len(train) - n, len(train))
    train_samples = [train[i] for i in picked]  # teacher-forced features computed by the fp32 target, as held's

    def score(samples):
        metrics = evaluate(model, objective.embed, objective.head, objective.vocab, objective.vocab_index, samples, cfg)
        return {key: round(value, 4) if isinstance(value, float) else value for key, value in metrics.items()}

    result = {"drafter": args.drafter, "flags": flags, "sequences": n, "train_from": args.train_from,
              "train_ids": [train.ids[i] for i in (picked[0], picked[-1])],
              "heldout": score(held), "train": score(train_samples)}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text + "\n")
    return result


if __name__ == "__main__":
    main()
