"""Drafters: who proposes the token trees the target verifies. Which kinds exist is :mod:`.registry`'s table."""

from __future__ import annotations

from pathlib import Path

from .base import Drafter, NoDrafter
from .lookahead import LookaheadDrafter
from .ngram import PromptLookupDrafter
from .registry import BY_NAME, MODEL_FREE_NAMES, TRAINED_NAMES, kind_for_format

__all__ = ["Drafter", "LookaheadDrafter", "NoDrafter", "PromptLookupDrafter", "load_checkpoint",
           "make_drafter", "shipped_drafter_dir"]

MODEL_FREE = {name: BY_NAME[name] for name in MODEL_FREE_NAMES}  # drafters that need no checkpoint
SHIPPED_KINDS = TRAINED_NAMES  # trained drafters a built-in model may ship with
SHIPPED_DIR = Path(__file__).resolve().parent.parent / "assets" / "drafters"


def shipped_drafter_dir(model: str, kind: str) -> Path:
    """Where the ``kind`` drafter shipped for ``model`` lives, e.g. ``assets/drafters/smollm2-135m-falcon``."""
    return SHIPPED_DIR / f"{Path(model).name}-{kind}"


def drafter_directory(model: str, name: str) -> str:
    """A trained drafter's directory: ``name`` as given, or, for a shipped kind (``falcon``, ``eagle``, ...), the one
    shipped for ``model``."""
    return str(shipped_drafter_dir(model, name)) if name in SHIPPED_KINDS else name


def make_drafter(name: str, target=None, **options) -> Drafter:
    """A drafter by name (model-free: ``none``, ``pld``, ``lookahead``; trained: ``falcon``, ``eagle``, ``eagle3`` or
    ``medusa``, the drafter shipped for a built-in target; see :mod:`.registry`) or from a trained drafter
    checkpoint directory for ``target``.

    ``options`` go to the drafter's constructor (``num_nodes``, ``depth``, ...; ``dtype`` for trained drafters,
    by default the target's).
    Without ``num_nodes`` and ``depth`` the drafter is planned: the generator sizes its trees from this machine's
    measured costs (:mod:`..planner`).
    """
    if name in MODEL_FREE:
        return MODEL_FREE[name].make(**options)
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
        options.setdefault("dtype", target.dtype)
        return load_checkpoint(name, target, **options)
    raise ValueError(f"unknown drafter {name!r}: choose one of {sorted(MODEL_FREE) + list(SHIPPED_KINDS)} or a drafter "
                     "checkpoint directory "
                     "(a directory with config.json, written by `falconspec train`)")


def load_checkpoint(directory: str | Path, target, **options) -> Drafter:
    """A trained drafter from its checkpoint directory; the ``format`` in its config.json picks the loader
    (:func:`.registry.kind_for_format`)."""
    import json

    from .sar_model import CONFIG_FILE

    config = Path(directory) / CONFIG_FILE
    if not Path(directory).is_dir():
        raise FileNotFoundError(f"drafter checkpoint directory {str(directory)!r} does not exist")
    if not config.is_file():
        raise FileNotFoundError(f"drafter checkpoint {str(directory)!r} has no {CONFIG_FILE}: pass the directory "
                                "written by `falconspec train` (its drafter/ or checkpoint/ folder)")
    try:
        kind = json.loads(config.read_text()).get("format")
    except (json.JSONDecodeError, AttributeError) as err:
        raise ValueError(f"{config} is not a drafter config: {err}") from err
    return kind_for_format(kind).load(directory, target, **options)
