"""How much of a token dataset's answer text repeats itself: the share of answer tokens that complete a 5-gram which
already occurred earlier in their sequence (prompt or answers). Greedy answers of a small target fall into loops, which
a drafter, or prompt lookup, predicts easily; the bench's 64-token answers mostly stop before one.

usage: python recipes/repetition.py DIR[:SPLIT[:FIRST]] ...   (SPLIT: train, heldout or all; FIRST: count only each
       answer's first FIRST tokens)
e.g.   python recipes/repetition.py recipes/data/sharegpt-sd-t07:train recipes/data/sharegpt-sd:heldout \\
           recipes/data/sharegpt-sd:heldout:64 runs/data/mtbench-sd:all
"""

from __future__ import annotations

import argparse
import json

N = 5


def repeated_share(data_dir: str, split: str = "all", first: int | None = None,
                   only: set[str] | None = None) -> dict:
    """Answer tokens counted and the share of them that complete an ``N``-gram seen earlier in their sequence;
    ``only``: count these conversation ids only."""
    from falconspec.token_data import iter_token_samples

    repeated = total = 0
    ids = set()
    for _, shard in iter_token_samples(data_dir, split):
        for sample in shard:
            if only is not None and sample.id not in only:
                continue
            ids.add(sample.id)
            tokens, mask, seen, in_answer = list(sample.input_ids), list(sample.loss_mask), set(), 0
            for i in range(len(tokens)):
                in_answer = in_answer + 1 if mask[i] else 0  # position within the current answer
                if i < N - 1:
                    continue
                gram = tuple(tokens[i - N + 1: i + 1])
                if mask[i] and (first is None or in_answer <= first):
                    total += 1
                    repeated += gram in seen
                seen.add(gram)
    return {"answer_tokens": total, "repeated_share": round(repeated / max(total, 1), 3), "ids": ids}


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("sets", nargs="+", help="DIR[:SPLIT[:FIRST]]")
    parser.add_argument("--same-conversations", action="store_true",
                        help="count the later sets only on the conversations of the first")
    args = parser.parse_args(argv)
    results, only = [], None
    for spec in args.sets:
        parts = spec.split(":")
        data_dir, split, first = parts[0], parts[1] if len(parts) > 1 else "all", parts[2] if len(parts) > 2 else ""
        found = repeated_share(data_dir, split, int(first) if first else None, only)
        if args.same_conversations and only is None:
            only = found["ids"]
        results.append({"set": spec, "answer_tokens": found["answer_tokens"],
                        "repeated_share": found["repeated_share"]})
        print(json.dumps(results[-1]))
    return results


if __name__ == "__main__":
    main()
