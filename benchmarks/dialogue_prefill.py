"""What prefilling a round's rows in groups saves gen-data: the same ShareGPT train conversations answered turn after
turn by :class:`~falconspec.dialogue_batch.DialogueBatch` (``--cache reuse``, gen-data's default) with each round's new
tokens prefilled in one right-aligned forward (every row padded to the longest segment, as before) and in at most
four groups of similar lengths (the default), one process, the variants alternating. Reports answer tokens per
second, the seconds spent prefilling and decoding, the padding efficiency of each phase (real tokens / row-columns
forwarded) and how many answers are identical across the variants (bf16 batched rounding may flip near-ties when
a row's batch changes; in float32 the tests require identity).

    python benchmarks/dialogue_prefill.py [--conversations 32] [--repeats 1] [--dtype auto] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from falconspec.calibrate import fingerprint
from falconspec.data import load_conversations, sharegpt_split
from falconspec.dialogue_batch import DialogueBatch
from falconspec.models import load_target
from falconspec.token_data import Dialogue, GenStats, resolve_gen_dtype, stream_dialogues


def answer(target, convs, args, max_forwards: int) -> dict:
    """Answer ``convs`` with ``max_forwards`` prefill groups; timing and padding per phase."""
    phases = {phase: {"seconds": 0.0, "row_columns": 0, "real": 0} for phase in ("prefill", "decode")}
    forward = DialogueBatch._forward

    def timed(self, tokens, positions, real):
        start = time.perf_counter()
        following = forward(self, tokens, positions, real)
        phase = phases["decode" if tokens.shape[1] == 1 else "prefill"]
        phase["seconds"] += time.perf_counter() - start
        phase["row_columns"] += tokens.numel()
        phase["real"] += int(real.sum())
        return following

    DialogueBatch._forward, DialogueBatch.MAX_PREFILL_FORWARDS = timed, max_forwards
    stats, start = GenStats(), time.perf_counter()
    try:
        dialogues = list(stream_dialogues(target.model, target.tokenizer, [Dialogue(c, args.max_turns) for c in convs],
                                          args.max_len, args.max_new_tokens, args.batch_size, stats))
    finally:
        DialogueBatch._forward, DialogueBatch.MAX_PREFILL_FORWARDS = forward, 4
    wall = time.perf_counter() - start
    for phase in phases.values():
        phase["seconds"] = round(phase["seconds"], 1)
        phase["efficiency"] = round(phase["real"] / phase["row_columns"], 3) if phase["row_columns"] else None
    answers = {d.conv.id: d.sample.input_ids for d in dialogues}
    return {"max_prefill_forwards": max_forwards, "wall_seconds": round(wall, 1),
            "answer_tokens": stats.answer_tokens, "answer_tokens_per_s": round(stats.answer_tokens / wall, 1),
            **phases, "_answers": answers}


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=32)
    parser.add_argument("--offset", type=int, default=9000, help="first train conversation (file order) to answer")
    parser.add_argument("--max-turns", type=int, default=4)
    parser.add_argument("--max-len", type=int, default=1024)
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=1, help="runs of each variant, alternating")
    parser.add_argument("--dtype", default="auto", help="generation dtype (gen-data's --gen-dtype)")
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()

    dtype = resolve_gen_dtype(args.dtype)
    target = load_target("smollm2-135m", dtype=dtype)
    train = sharegpt_split(load_conversations("sharegpt", need_answer=False), "train")
    convs = train[args.offset: args.offset + args.conversations]
    runs = []
    for repeat in range(args.repeats):
        for max_forwards in ((1, 4) if repeat % 2 == 0 else (4, 1)):
            runs.append(answer(target, convs, args, max_forwards))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "_answers"}))
    one = next(r for r in runs if r["max_prefill_forwards"] == 1)["_answers"]
    grouped = next(r for r in runs if r["max_prefill_forwards"] == 4)["_answers"]
    same = sum(one[i] == grouped.get(i) for i in one)
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"} | {"dtype": dtype},
              "machine": fingerprint(target), "identical_conversations": f"{same}/{len(one)}",
              "runs": [{k: v for k, v in r.items() if k != "_answers"} for r in runs]}
    for variant in (1, 4):
        rates = [r["answer_tokens_per_s"] for r in runs if r["max_prefill_forwards"] == variant]
        result[f"answer_tokens_per_s_{variant}"] = sorted(rates)[len(rates) // 2]
    result["speedup"] = round(result["answer_tokens_per_s_4"] / result["answer_tokens_per_s_1"], 2)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
