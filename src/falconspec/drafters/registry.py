"""The drafter registry: every drafter kind falconspec knows, one :class:`DrafterKind` entry each.

Everything that lists drafters reads this table: :func:`~falconspec.drafters.make_drafter` (names),
:func:`~falconspec.drafters.load_checkpoint` (the ``format`` of a checkpoint's config.json picks the loader),
``SHIPPED_KINDS`` (trained kinds a built-in model may ship, ``assets/drafters/<model>-<kind>``), the benchmark's
method names (:mod:`falconspec.bench.methods`), the command line's choices, and the trainers (each trained kind
names its :class:`~falconspec.trainer.Objective`).

Adding a drafter: write its module (a :class:`~falconspec.drafters.base.Drafter`; for a trained one also its
network with ``save_pretrained``/``from_pretrained`` writing a config.json with its own ``format``, and an
``Objective`` for the one training loop), then add one entry to :data:`KINDS`. References are ``"module:attribute"``
strings, imported on first use, so listing kinds costs no imports.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass


def resolve(reference: str):
    """``"package.module:Name.attr"`` -> the object (imported now)."""
    module, _, path = reference.partition(":")
    obj = importlib.import_module(module)
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class DrafterKind:
    name: str  # --drafter NAME, bench method NAME, shipped directory suffix
    summary: str  # a few words for help texts
    drafter: str  # model-free: the Drafter class (options -> drafter); trained: a loader (directory, target, **options)
    model_free: bool = False
    format: str = ""  # trained: the ``format`` its checkpoints' config.json names
    objective: str = ""  # trained: its training objective class (a falconspec.trainer.Objective)
    train_command: str = ""  # trained: how to train one, for help texts

    def make(self, **options):
        """A model-free drafter."""
        return resolve(self.drafter)(**options)

    def load(self, directory, target, **options):
        """A trained drafter from its checkpoint directory."""
        return resolve(self.drafter)(directory, target, **options)


# order: how help texts and ``bench --methods all`` list them
KINDS: tuple[DrafterKind, ...] = (
    DrafterKind("none", "no drafting", "falconspec.drafters.base:NoDrafter", model_free=True),
    DrafterKind("pld", "prompt lookup", "falconspec.drafters.ngram:PromptLookupDrafter", model_free=True),
    DrafterKind("falcon", "Falcon SAR drafter (k=2)", "falconspec.drafters.sar:SARDrafter.from_pretrained",
                format="falconspec-sar", objective="falconspec.train:SARObjective",
                train_command="falconspec train --kind sar --k 2"),
    DrafterKind("eagle", "EAGLE-style head (k=1)", "falconspec.drafters.sar:SARDrafter.from_pretrained",
                format="falconspec-sar", objective="falconspec.train:SARObjective",
                train_command="falconspec train --kind sar --k 1"),
    DrafterKind("eagle3", "EAGLE-3 drafter", "falconspec.drafters.eagle3_model:load_drafter",
                format="falconspec-eagle3", objective="falconspec.train_eagle3:Eagle3Objective",
                train_command="falconspec train-eagle3"),
    DrafterKind("medusa", "Medusa heads", "falconspec.drafters.medusa:MedusaDrafter.from_pretrained",
                format="falconspec-medusa", objective="falconspec.train_medusa:MedusaObjective",
                train_command="falconspec train --kind medusa"),
    DrafterKind("lookahead", "lookahead decoding", "falconspec.drafters.lookahead:LookaheadDrafter",
                model_free=True),
)
BY_NAME = {kind.name: kind for kind in KINDS}
MODEL_FREE_NAMES = tuple(kind.name for kind in KINDS if kind.model_free)
TRAINED_NAMES = tuple(kind.name for kind in KINDS if not kind.model_free)  # a built-in model may ship these
FALLBACK_FORMAT = "falconspec-sar"  # config.json of another format goes to the SAR loader, whose check names it


def kind_for_format(fmt: str | None) -> DrafterKind:
    """The trained kind whose checkpoints have this ``format`` (the first, if several share it)."""
    return next((k for k in KINDS if k.format and k.format == fmt),
                next(k for k in KINDS if k.format == FALLBACK_FORMAT))


def objectives() -> dict[str, type]:
    """Training objective classes by their name, in registry order (imports the trainers)."""
    found: dict[str, type] = {}
    for kind in KINDS:
        if kind.objective:
            cls = resolve(kind.objective)
            found.setdefault(cls.name, cls)
    return found


def shard_objectives() -> dict[str, type]:
    """The objectives ``falconspec train --kind`` runs: those trained on gen-data shards (``TrainConfig``)."""
    from ..train_common import ShardObjective

    return {name: cls for name, cls in objectives().items() if issubclass(cls, ShardObjective)}
