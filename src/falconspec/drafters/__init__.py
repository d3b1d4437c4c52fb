"""Drafters: who proposes the token trees the target verifies."""

from __future__ import annotations

from .base import Drafter, NoDrafter
from .ngram import PromptLookupDrafter

__all__ = ["Drafter", "NoDrafter", "PromptLookupDrafter", "make_drafter"]

MODEL_FREE = {"none": NoDrafter, "pld": PromptLookupDrafter}


def make_drafter(name: str, target=None) -> Drafter:
    """A drafter by name (``none``, ``pld``) or from a trained drafter checkpoint directory for ``target``."""
    if name in MODEL_FREE:
        return MODEL_FREE[name]()
    raise ValueError(f"unknown drafter {name!r}: choose one of {sorted(MODEL_FREE)} or a drafter checkpoint directory")
