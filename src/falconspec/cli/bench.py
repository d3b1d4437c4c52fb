"""``falconspec bench``: speed-up, acceptance and exactness of decoding methods on MT-bench, HumanEval, held-out
ShareGPT or your own JSONL prompts. All methods run in one process on the same prompts, interleaved per prompt.

Writes to --out: answers/<dataset>/<method>-<dtype>-t<T>.jsonl (Spec-Bench's answer schema), summary.json,
summary.md and plots/*.png. Example: falconspec bench --quick --out runs/bench-quick

With --batch-size B [B ...], the batched throughput benchmark instead: tokens/s of each method at each batch size
(falconspec.bench.batch), in summary.json and summary.md.
"""

from __future__ import annotations

import argparse
import importlib.util
import shlex
import sys

from .common import add_budget_args

QUICK_PROMPTS, QUICK_TOKENS, DEFAULT_TOKENS = 2, 32, 256


def register(subparsers) -> None:
    from ..bench.methods import CHECKPOINT_METHODS, METHOD_NAMES

    parser = subparsers.add_parser("bench", help="benchmark decoding methods against plain greedy decoding",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--model", default="smollm2-135m", help="built-in alias, model directory or hub id")
    parser.add_argument("--methods", nargs="+", default=["all"],
                        help=f"all, or some of: {', '.join(METHOD_NAMES)} (greedy, the baseline, always runs; so "
                             "does llamacpp with the llamacpp-* methods)")
    parser.add_argument("--datasets", nargs="+", default=["mt-bench"],
                        help="mt-bench, humaneval, sharegpt (held-out split) or paths of JSONL prompt files")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help=f"per turn (default {DEFAULT_TOKENS}; {QUICK_TOKENS} with --quick)")
    parser.add_argument("--temperature", type=float, nargs="+", default=[0.0],
                        help="one or more; 0 = greedy, > 0 = sampling with a fixed seed per prompt (default 0)")
    parser.add_argument("--dtype", nargs="+", default=["float32"], help="one or more of float32, bfloat16, float16")
    parser.add_argument("--num-prompts", type=int, default=None,
                        help=f"first N prompts of each dataset (default all; {QUICK_PROMPTS} with --quick)")
    parser.add_argument("--max-turns", type=int, default=None,
                        help="answer only the first N turns of multi-turn prompts (default all; 1 = MT-bench first turns)")
    parser.add_argument("--quick", action="store_true",
                        help=f"smoke run: {QUICK_PROMPTS} prompts per dataset, {QUICK_TOKENS} new tokens per turn")
    parser.add_argument("--seed", type=int, default=0, help="base sampling seed (seed + 100 * prompt index + turn)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed warm-up generations per method (default 1)")
    parser.add_argument("--batch-size", type=int, nargs="+", default=None, metavar="B",
                        help="batch mode: answer the prompts through the batched engine with at most B sequences at "
                             "once, for each B given (1 always runs, the reference), and report total tokens/s per "
                             "method and batch size, and whether greedy answers equal batch size 1's; our engine's "
                             "methods only, no answer files or plots")
    parser.add_argument("--resume", action="store_true", help="continue a run in --out with the same settings")
    parser.add_argument("--mt-bench-file", default=None,
                        help="MT-bench question.jsonl (relative to the working directory; default "
                             "$FALCONSPEC_MT_BENCH, else the 80 questions shipped with falconspec)")
    for kind in CHECKPOINT_METHODS:
        parser.add_argument(f"--{kind}-drafter", default=None, metavar="DIR",
                            help=f"trained {kind} drafter (default: the shipped one of a built-in model)")
    parser.add_argument("--assistant", default="6",
                        help="hf-assisted draft model: N = the target's first N layers (weights shared), or the "
                             "directory of a small model with the target's tokenizer (default: 6)")
    parser.add_argument("--prompt-lookup-tokens", type=int, default=10, help="hf-pld prompt_lookup_num_tokens")
    parser.add_argument("--llamacpp-draft", default=None, metavar="PATH",
                        help="llamacpp-eagle3: the EAGLE-3 draft GGUF file (falconspec export --format gguf; default: "
                             "the EAGLE-3 drafter shipped for a built-in model, exported once into the cache); the "
                             "llamacpp methods need xllamacpp: pip install 'falconspec[llamacpp]'")
    add_budget_args(parser)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def _split(values: list[str]) -> tuple[str, ...]:
    """Accept both ``--methods a b`` and ``--methods a,b``."""
    return tuple(v for value in values for v in value.split(",") if v)


def _default(value, default):
    return default if value is None else value


def run(args: argparse.Namespace) -> int:
    for package, extra in (("matplotlib", "bench"), ("psutil", "bench")):
        if importlib.util.find_spec(package) is None:
            raise RuntimeError(f"falconspec bench needs {package}: pip install 'falconspec[{extra}]'")
    import torch

    from ..bench import BenchConfig, MethodOptions, run_bench, write_report
    from ..bench.methods import CHECKPOINT_METHODS

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    options = MethodOptions(
        drafter_dirs={k: v for k in CHECKPOINT_METHODS if (v := getattr(args, f"{k}_drafter"))},
        assistant=args.assistant, prompt_lookup_tokens=args.prompt_lookup_tokens, matmul_path=args.matmul_path,
        num_nodes=args.num_nodes, depth=args.depth, llamacpp_draft=args.llamacpp_draft)
    config = BenchConfig(
        out=args.out, model=args.model, methods=_split(args.methods), datasets=_split(args.datasets),
        max_new_tokens=_default(args.max_new_tokens, QUICK_TOKENS if args.quick else DEFAULT_TOKENS),
        temperatures=tuple(args.temperature), dtypes=_split(args.dtype),
        num_prompts=_default(args.num_prompts, QUICK_PROMPTS if args.quick else None), max_turns=args.max_turns,
        seed=args.seed,
        device=args.device,
        warmup=args.warmup, resume=args.resume, mt_bench_file=args.mt_bench_file, options=options,
        progress=not args.no_progress, batch_sizes=None if args.batch_size is None else tuple(args.batch_size))
    summary = run_bench(config)
    summary["command"] = shlex.join(["falconspec", *sys.argv[1:]]) if sys.argv[1:2] == ["bench"] else None
    files = write_report(args.out, summary)
    sys.stdout.write(files[1].read_text())
    print("\nwrote " + ", ".join(str(f) for f in files), file=sys.stderr)
    return 0
