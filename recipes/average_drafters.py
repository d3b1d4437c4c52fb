"""Average the weights of drafters of one architecture (checkpoint averaging, "model soup" of one lineage).

    python recipes/average_drafters.py --out runs/curve/falcon-avg/drafter runs/round8/falcon runs/round9/falcon

Every input is a drafter directory (``config.json``, ``model.safetensors``) of one kind (Falcon/EAGLE-style SAR or
Medusa). Their configs must be equal once read (a key an older falconspec did not write reads as its default) and
their tensors of equal names and shapes. The output gets that config, the mean of the tensors (computed in float32,
stored in each tensor's own dtype; ``--weights`` for a weighted mean) and a ``recipe.json`` that names the inputs and
holds their own recipes. Averaging is meaningful for drafters of one lineage (one continued from the other, or stages
of one run), whose weights lie close together.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors.torch import load_file

from falconspec.drafters.medusa import MedusaConfig
from falconspec.drafters.sar_model import SARConfig, save_drafter_state

CONFIGS = {"falconspec-sar": SARConfig, "falconspec-medusa": MedusaConfig}


def read_config(directory: Path):
    if not (directory / "config.json").is_file() or not (directory / "model.safetensors").is_file():
        raise SystemExit(f"{directory}: not a drafter directory (config.json and model.safetensors)")
    data = json.loads((directory / "config.json").read_text())
    if data.get("format") not in CONFIGS:
        raise SystemExit(f"{directory}: a drafter of format {data.get('format')!r}; averaged: {sorted(CONFIGS)}")
    return CONFIGS[data["format"]].from_json(data, source=str(directory / "config.json"))


def read_recipe(directory: Path) -> dict | None:
    path = directory / "recipe.json"
    return json.loads(path.read_text()) if path.exists() else None


def average(dirs: list[Path], weights: list[float]) -> tuple[object, dict]:
    """The drafters' common config and the weighted mean of their tensors."""
    configs = [read_config(d) for d in dirs]
    if any(c != configs[0] for c in configs[1:]):
        raise SystemExit("the drafters' configs differ: only drafters of one architecture can be averaged")
    states = [load_file(d / "model.safetensors") for d in dirs]
    names = set(states[0])
    for d, s in zip(dirs[1:], states[1:]):
        if set(s) != names or any(s[n].shape != states[0][n].shape for n in names):
            raise SystemExit(f"{d}: tensor names or shapes differ from {dirs[0]}")
        for n in names:  # integer tensors (the draft vocabulary's token ids) are indices, not weights
            if not states[0][n].is_floating_point() and not torch.equal(s[n], states[0][n]):
                raise SystemExit(f"{d}: {n} differs from {dirs[0]}'s (integer tensors must be equal)")
    total = sum(weights)
    return configs[0], {n: sum(w / total * s[n].float() for w, s in zip(weights, states)).to(states[0][n].dtype)
                        if states[0][n].is_floating_point() else states[0][n] for n in sorted(names)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("drafters", nargs="+", type=Path, help="drafter directories (config.json, model.safetensors)")
    parser.add_argument("--out", type=Path, required=True, help="the averaged drafter's directory")
    parser.add_argument("--weights", type=float, nargs="+", help="one weight per drafter (default: equal)")
    args = parser.parse_args(argv)
    if len(args.drafters) < 2:
        parser.error("give two drafters or more")
    weights = args.weights or [1.0] * len(args.drafters)
    if len(weights) != len(args.drafters) or min(weights) < 0 or sum(weights) <= 0:
        parser.error("--weights: one non-negative weight per drafter, not all zero")
    config, state = average(args.drafters, weights)
    fmt = next(f for f, cls in CONFIGS.items() if isinstance(config, cls))
    save_drafter_state(state, args.out, {"format": fmt, **asdict(config)})  # as the drafters' own save writes
    recipe = {"command": "python recipes/average_drafters.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "note": "the weighted mean of the inputs' tensors (float32 arithmetic); each input's own recipe below",
              "averaged_from": [{"drafter": str(d), "weight": w, "recipe": read_recipe(d)}
                                for d, w in zip(args.drafters, weights)]}
    (args.out / "recipe.json").write_text(json.dumps(recipe, indent=2) + "\n")
    print(f"averaged {len(args.drafters)} drafters into {args.out}")


if __name__ == "__main__":
    main()
