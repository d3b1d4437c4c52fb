"""What gen-data's batching choices save: the same ShareGPT train conversations answered turn after turn by
:func:`~falconspec.token_data.stream_dialogues` (``--cache reuse``, gen-data's default), one process, the variants
alternating:

* ``padded``: each round's new tokens prefilled in one right-aligned forward (every row padded to the longest
  segment) and every round decoded until its longest answer ends (gen-data before 2026-12-04);
* ``grouped``: the new tokens prefilled in at most four forwards of rows with similar lengths;
* ``grouped+early`` (the default): besides, a round ends once a quarter of its rows have ended their answer, the
  others carrying their answers into the next round while the ended rows take new turns.

Reports answer tokens per second, the seconds spent prefilling and decoding, each phase's padding efficiency (real
tokens / row-columns forwarded) and how many conversations are identical to the first variant's (bf16 batched
rounding may flip near-ties when a row's batch changes; in float32 the tests require identity).

    python benchmarks/gen_data_batching.py [--conversations 64] [--repeats 1] [--dtype auto] [--out FILE.json]
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
from falconspec.token_data import REFILL_AT, Dialogue, GenStats, resolve_gen_dtype, stream_dialogues


VARIANTS = {"padded": (1, 1.0), "grouped": (4, 1.0), "grouped+early": (4, REFILL_AT)}  # prefill forwards, refill_at


def answer(target, convs, args, variant: str) -> dict:
    """Answer ``convs`` as ``variant`` does; timing and padding per phase."""
    max_forwards, refill_at = VARIANTS[variant]
    phases = {phase: {"seconds": 0.0, "row_columns": 0, "real": 0} for phase in ("prefill", "decode")}
    forward, saved = DialogueBatch._forward, DialogueBatch.MAX_PREFILL_FORWARDS

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
                                          args.max_len, args.max_new_tokens, args.batch_size, stats,
                                          refill_at=refill_at))
    finally:
        DialogueBatch._forward, DialogueBatch.MAX_PREFILL_FORWARDS = forward, saved
    wall = time.perf_counter() - start
    for phase in phases.values():
        phase["seconds"] = round(phase["seconds"], 1)
        phase["efficiency"] = round(phase["real"] / phase["row_columns"], 3) if phase["row_columns"] else None
    answers = {d.conv.id: d.sample.input_ids for d in dialogues}
    return {"variant": variant, "wall_seconds": round(wall, 1),
            "answer_tokens": stats.answer_tokens, "answer_tokens_per_s": round(stats.answer_tokens / wall, 1),
            **phases, "_answers": answers}


@torch.inference_mode()
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conversations", type=int, default=64)
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
        for variant in (list(VARIANTS) if repeat % 2 == 0 else list(VARIANTS)[::-1]):
            runs.append(answer(target, convs, args, variant))
            print(json.dumps({k: v for k, v in runs[-1].items() if k != "_answers"}))
    first = next(r for r in runs if r["variant"] == "padded")["_answers"]
    result = {"settings": {k: v for k, v in vars(args).items() if k != "out"} | {"dtype": dtype},
              "machine": fingerprint(target), "runs": [{k: v for k, v in r.items() if k != "_answers"} for r in runs]}
    for variant in VARIANTS:
        mine = [r for r in runs if r["variant"] == variant]
        rates = sorted(r["answer_tokens_per_s"] for r in mine)
        answers = mine[0]["_answers"]
        result[variant] = {"answer_tokens_per_s": rates[len(rates) // 2],
                           "identical_to_padded": f"{sum(first[i] == answers.get(i) for i in first)}/{len(first)}"}
    for variant in list(VARIANTS)[1:]:
        result[variant]["speedup"] = round(result[variant]["answer_tokens_per_s"]
                                           / result["padded"]["answer_tokens_per_s"], 2)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
