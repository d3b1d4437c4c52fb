"""``falconspec export``: write a trained EAGLE-3 drafter (k=1) for another engine.

``--format eagle3`` writes a directory vLLM (``--speculative-config '{"method": "eagle3", "model": OUT, ...}'``)
and SGLang (``--speculative-algorithm EAGLE3 --speculative-draft-model-path OUT``) load; ``--format gguf`` writes
the GGUF llama.cpp loads with ``--spec-type draft-eagle3 --spec-draft-model OUT`` (it needs ``--target``, the
target's GGUF or model directory, for the vocabulary). See docs/export.md.
"""

from __future__ import annotations

import argparse

DEFAULT_DTYPES = {"eagle3": "bfloat16", "gguf": "float16"}


def register(subparsers) -> None:
    parser = subparsers.add_parser("export", help="export an EAGLE-3 drafter for vLLM/SGLang (eagle3) or llama.cpp "
                                                  "(gguf)", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--drafter", required=True, help="EAGLE-3 drafter checkpoint directory (format "
                                                         "falconspec-eagle3)")
    parser.add_argument("--format", required=True, choices=("eagle3", "gguf"),
                        help="eagle3: Hugging Face directory for vLLM and SGLang; gguf: llama.cpp file")
    parser.add_argument("--out", required=True, help="output directory (eagle3) or .gguf file (gguf)")
    parser.add_argument("--target", default=None,
                        help="the target: its GGUF or model directory (required for gguf, whose vocabulary it "
                             "provides; for eagle3 only checked against the drafter's sizes)")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default=None,
                        help="weight dtype (default: bfloat16 for eagle3, float16 for gguf; GGUF norms stay float32)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..export import export_eagle3, export_gguf

    dtype = args.dtype or DEFAULT_DTYPES[args.format]
    if args.format == "gguf":
        if args.target is None:
            raise ValueError("--format gguf needs --target: the target's GGUF (preferred) or model directory")
        out = export_gguf(args.drafter, args.out, args.target, dtype=dtype)
    else:
        out = export_eagle3(args.drafter, args.out, target=args.target, dtype=dtype)
    print(f"export: wrote {out}")
    return 0
