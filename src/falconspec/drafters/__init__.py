"""Drafters: who proposes the token trees the target verifies."""

from __future__ import annotations

from pathlib import Path

from .base import Drafter, NoDrafter
from .ngram import PromptLookupDrafter

__all__ = ["Drafter", "NoDrafter", "PromptLookupDrafter", "make_drafter", "shipped_drafter_dir"]

MODEL_FREE = {"none": NoDrafter, "pld": PromptLookupDrafter}
SHIPPED_KINDS = ("falcon", "eagle")  # trained drafters a built-in model may ship with (k=2 SAR, k=1 head)
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "drafters"


def shipped_drafter_dir(model: str, kind: str) -> Path:
    """Where the ``kind`` drafter shipped for ``model`` lives, e.g. ``assets/drafters/smollm2-135m-falcon``."""
    return SHIPPED_DIR / f"{Path(model).name}-{kind}"


def make_drafter(name: str, target=None, **options) -> Drafter:
    """A drafter by name (``none``, ``pld``; ``falcon`` or ``eagle``: the drafter shipped for a built-in target) or
    from a trained drafter checkpoint directory for ``target``.

    ``options`` go to :class:`~falconspec.drafters.sar.SARDrafter` (``dtype``, ``num_nodes``, ``depth``, ...).
    """
    if name in MODEL_FREE:
        return MODEL_FREE[name]()
    if name in SHIPPED_KINDS:
        if target is None:
            raise ValueError(f"the {name} drafter needs the target model it drafts for")
        path = shipped_drafter_dir(target.name, name)
        if not path.is_dir():
            shipped = sorted(p.name for p in SHIPPED_DIR.iterdir()) if SHIPPED_DIR.is_dir() else []
            raise ValueError(f"no {name} drafter ships for model {target.name!r} (shipped: {', '.join(shipped)}): "
                             "train one with `falconspec gen-data` + `falconspec train` and pass its directory")
        name = str(path)
    if Path(name).is_dir() or "/" in name:  # a checkpoint path: from_pretrained names what is missing
        if target is None:
            raise ValueError(f"drafter checkpoint {name!r} needs the target model it drafts for")
        from .sar import SARDrafter

        return SARDrafter.from_pretrained(name, target, **options)
    raise ValueError(f"unknown drafter {name!r}: choose one of {sorted(MODEL_FREE) + list(SHIPPED_KINDS)} or a drafter "
                     "checkpoint directory "
                     "(a directory with config.json, written by `falconspec train`)")
