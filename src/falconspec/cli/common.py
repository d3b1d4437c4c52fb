"""Arguments shared by several subcommands."""

from __future__ import annotations

import argparse
import dataclasses

from ..drafters.registry import MODEL_FREE_NAMES, TRAINED_NAMES


def add_model_args(parser: argparse.ArgumentParser, drafter_default: str = "auto") -> None:
    parser.add_argument("--model", default="smollm2-135m",
                        help="built-in alias (smollm2-135m), local model directory or hub id (default: %(default)s)")
    parser.add_argument("--drafter", default=drafter_default,
                        help=f"auto (the Falcon drafter shipped for the model if there is one, else pld), "
                             f"{', '.join(MODEL_FREE_NAMES)}, {', '.join(TRAINED_NAMES)} (drafters shipped for the "
                             "built-in model), or a trained drafter checkpoint directory (default: %(default)s)")
    parser.add_argument("--dtype", default="float32", help="float32 (lossless on CPU), bfloat16 or float16")
    parser.add_argument("--device", default="cpu", help="torch device, e.g. cpu or cuda:0")
    add_budget_args(parser)


def add_budget_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--num-nodes", type=int, default=None,
                        help="fixed tree size per verification, root included (default: planned from this machine's "
                             "measured costs, see `falconspec calibrate`)")
    parser.add_argument("--depth", type=int, default=None, help="fixed drafting depth (default: planned)")
    parser.add_argument("--matmul-path", choices=("auto", "stock", "few-row", "onednn"), default="auto",
                        help="product path of few-row forwards: the measured fastest per row count (auto), or one "
                             "forced (default: %(default)s)")


def add_sampling_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--seed", type=int, default=None)


def load_model_and_drafter(args: argparse.Namespace):
    from ..drafters import make_drafter, shipped_drafter_dir
    from ..models import load_target

    target = load_target(args.model, dtype=args.dtype, device=args.device)
    name = args.drafter
    if name == "auto":
        name = "falcon" if shipped_drafter_dir(target.name, "falcon").is_dir() else "pld"
    budget = {k: v for k in ("num_nodes", "depth") if (v := getattr(args, k, None)) is not None}
    if budget and name == "none":
        raise ValueError("--num-nodes and --depth size a drafter's trees: they need a drafter")
    return target, make_drafter(name, target, **budget)


def add_config_flags(parser: argparse.ArgumentParser, config_class, choices: dict[str, list] | None = None) -> None:
    """One flag per field of a settings dataclass (``--max-steps`` for ``max_steps``): required without a default,
    ``--x/--no-x`` for booleans, the field's ``metadata["help"]`` as help; ``choices`` per field name."""
    for field in dataclasses.fields(config_class):
        flag = "--" + field.name.replace("_", "-")
        text = field.metadata.get("help", "")
        if field.default is dataclasses.MISSING:
            parser.add_argument(flag, required=True, help=text or None)
        elif field.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=text or None)
        else:
            kind = {"int": int, "float": float}.get(str(field.type).split(" ")[0], str)
            parser.add_argument(flag, type=kind, default=field.default, choices=(choices or {}).get(field.name),
                                help=(text + " (default: %(default)s)").strip())


def config_from_args(config_class, args: argparse.Namespace):
    """The settings dataclass from parsed :func:`add_config_flags` flags."""
    names = {f.name for f in dataclasses.fields(config_class)}
    return config_class(**{k: v for k, v in vars(args).items() if k in names})
