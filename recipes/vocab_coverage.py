"""How much of the held-out answers a draft vocabulary can draft at all: the share of the held-out answer tokens of
the committed self-distilled token shards that lie in (a) a drafter's draft vocabulary (shipped or trained) and
(b) the N most frequent tokens of the train split's answers. A token outside the draft vocabulary is never drafted,
so the share caps acc@1.

usage: python recipes/vocab_coverage.py [--drafter falcon] [--sizes 2048 4096 8192 16384]
           [--answers runs/data/mtbench-sd --answers-split all]   (other answers: the MT-bench ones, say)
"""

from __future__ import annotations

import argparse
import collections
import json
from pathlib import Path

import numpy as np

DATA = Path(__file__).with_name("data") / "sharegpt-sd"


def answer_tokens(split: str, data: Path = DATA) -> np.ndarray:
    """Every answer token of the split's token shards, concatenated."""
    from falconspec.token_data import iter_token_samples

    return np.array([t for _, samples in iter_token_samples(data, split) for sample in samples
                     for lo, hi in sample.spans for t in sample.input_ids[lo:hi]])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", default="falcon", help="shipped drafter name or drafter directory")
    parser.add_argument("--sizes", type=int, nargs="+", default=[2048, 4096, 8192, 16384])
    parser.add_argument("--answers", type=Path, default=DATA, help="token dataset of the answers to cover")
    parser.add_argument("--answers-split", default="heldout", help="its split (heldout, train or all)")
    args = parser.parse_args(argv)
    from safetensors import safe_open

    from falconspec.drafters import drafter_directory

    covered, train = answer_tokens(args.answers_split, args.answers), answer_tokens("train")
    directory = drafter_directory("smollm2-135m", args.drafter)
    with safe_open(str(Path(directory) / "model.safetensors"), framework="np") as f:
        vocab = f.get_tensor("draft_vocab")
    counts = collections.Counter(train.tolist())
    report = {"answers": f"{args.answers} ({args.answers_split})", "answer_tokens": int(len(covered)),
              "train_answer_tokens": int(len(train)),
              "distinct_train_answer_tokens": len(counts),
              f"{args.drafter} ({len(vocab)})": round(float(np.isin(covered, vocab).mean()), 4),
              "unseen_in_train_answers": round(float((~np.isin(covered, list(counts))).mean()), 4)}
    for n in args.sizes:
        top = [t for t, _ in counts.most_common(n)]
        report[f"train top {n}"] = round(float(np.isin(covered, top).mean()), 4)
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
