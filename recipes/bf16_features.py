"""Features from a bf16 target pass against those from the fp32 one (recipes/README.md, "Features from a bf16 target
pass"): how they differ, and how much faster the pass is.

- ``compare REFERENCE OTHER``: over the sequences two feature directories both hold (``gen-data --from-tokens ...
  --dtype float32|bfloat16``), the share of positions where the target's greedy token differs (every position, and
  the answer positions a drafter trains on), and the relative error of the stored hidden states (|a - b| / |a| per
  position, median and 99th percentile).
- ``speed``: the teacher-forced pass that ``gen-data --from-tokens`` and ``falconspec train --data TOKENS`` make per
  sequence (:func:`falconspec.data.teacher_forced`), in both dtypes over the same sequences of the first train shard,
  in turn (one process, one dtype after the other per sequence, so a change in the machine's speed touches both):
  tokens per second per dtype (median over sequences, 25th-75th percentile), the ratio of the total times, the CPU.

usage: python recipes/bf16_features.py compare REFERENCE OTHER [--json OUT]
       OMP_NUM_THREADS=1 python recipes/bf16_features.py speed [--data recipes/data/sharegpt-sd] [--sequences 24]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from falconspec.calibrate import cpu_info
from falconspec.data import ShardDataset, teacher_forced
from falconspec.models import load_target
from falconspec.token_data import read_manifest, split_shards, token_sequences

DTYPES = ("float32", "bfloat16")


def compare(reference: str, other: str) -> dict:
    a, b = ShardDataset(reference), ShardDataset(other)
    if a.ids[: len(b.ids)] != b.ids[: len(a.ids)]:
        raise ValueError(f"{reference} and {other} hold other sequences")
    flips = answer_flips = positions = answers = 0
    errors = []
    for x, y in zip(a, b):  # the shorter one's sequences
        if not torch.equal(x["input_ids"], y["input_ids"]):
            raise ValueError("the two directories' token ids differ")
        differ = x["target_tokens"] != y["target_tokens"]
        answer = x["loss_mask"].bool()
        flips, answer_flips = flips + int(differ.sum()), answer_flips + int(differ[answer].sum())
        positions, answers = positions + len(differ), answers + int(answer.sum())
        ha, hb = x["hidden_states"].float(), y["hidden_states"].float()
        errors.append((ha - hb).norm(dim=-1) / ha.norm(dim=-1).clamp(min=1e-6))
    errors = torch.cat(errors)
    return {"reference": reference, "other": other, "sequences": min(len(a), len(b)), "positions": positions,
            "answer_positions": answers, "greedy_differs": round(flips / positions, 5),
            "greedy_differs_in_answers": round(answer_flips / max(answers, 1), 5),
            "hidden_relative_error_median": round(float(errors.median()), 5),
            "hidden_relative_error_p99": round(float(errors.quantile(0.99)), 5)}


def speed(data: str, model: str, count: int, max_len: int) -> dict:
    shard = split_shards(read_manifest(data), "train", data)[0]
    sequences = token_sequences(data, shard, max_len)[:count]
    targets = {dtype: load_target(model, dtype=dtype) for dtype in DTYPES}
    seconds = {dtype: [] for dtype in DTYPES}
    with torch.inference_mode():
        teacher_forced(targets["float32"], sequences[0])  # warm-up
        teacher_forced(targets["bfloat16"], sequences[0])
        for sequence in sequences:
            for dtype in DTYPES:
                start = time.perf_counter()
                teacher_forced(targets[dtype], sequence)
                seconds[dtype].append(time.perf_counter() - start)
    tokens = [len(s.input_ids) for s in sequences]
    processor, flags = cpu_info()
    result = {"sequences": len(sequences), "tokens": sum(tokens), "threads": torch.get_num_threads(),
              "processor": processor, "cpu_flags": flags, "torch": torch.__version__}
    for dtype in DTYPES:
        rates = sorted(n / t for n, t in zip(tokens, seconds[dtype]))
        quartiles = statistics.quantiles(rates, n=4)
        result[dtype] = {"tok_per_s_median": round(statistics.median(rates), 1),
                         "tok_per_s_iqr": [round(quartiles[0], 1), round(quartiles[2], 1)],
                         "seconds": round(sum(seconds[dtype]), 2)}
    result["bfloat16_speedup"] = round(result["float32"]["seconds"] / result["bfloat16"]["seconds"], 2)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    output = argparse.ArgumentParser(add_help=False)
    output.add_argument("--json", help="also write the figures to this file")
    commands = parser.add_subparsers(dest="command", required=True)
    diff = commands.add_parser("compare", parents=[output], help="how two feature directories differ")
    diff.add_argument("reference")
    diff.add_argument("other")
    fast = commands.add_parser("speed", parents=[output], help="the target's feature pass in float32 and in bfloat16")
    fast.add_argument("--data", default="recipes/data/sharegpt-sd", help="token dataset")
    fast.add_argument("--model", default="smollm2-135m")
    fast.add_argument("--sequences", type=int, default=24, help="sequences of the first train shard")
    fast.add_argument("--max-len", type=int, default=1024)
    args = parser.parse_args()
    if args.command == "compare":
        result = compare(args.reference, args.other)
    else:
        result = speed(args.data, args.model, args.sequences, args.max_len)
    print(json.dumps(result, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
