"""Load a script of ``recipes/`` (not a package: run as ``python recipes/NAME.py``) as a module for the tests."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

RECIPES = Path(__file__).parents[1] / "recipes"


def recipe_script(name: str) -> ModuleType:
    """The module of ``recipes/<name>.py``, executed once per call."""
    spec = importlib.util.spec_from_file_location(name, RECIPES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
