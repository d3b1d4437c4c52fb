"""How much each decoder layer of a SAR drafter changes what passes through it: per layer, the norm of its residual
update (output minus input) relative to its input, averaged over the first held-out sequences of the committed token
shards, teacher forced on the target's own features (as training sees them), and the root-mean-square of its output
projections (attention ``o_proj``, MLP ``down_proj``). A layer grown by ``falconspec train --num-layers`` starts at
zero in both; figures near zero mean it is still close to the identity it started as.

usage: python recipes/layer_use.py [--drafter DIR|falcon] [--samples 8]
"""

from __future__ import annotations

import argparse
import json
from itertools import islice
from pathlib import Path

import torch

DATA = Path(__file__).with_name("data") / "sharegpt-sd"


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--drafter", default="falcon", help="shipped drafter name or drafter directory")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--samples", type=int, default=8, help="held-out sequences to average over")
    args = parser.parse_args(argv)
    from falconspec.drafters import drafter_directory
    from falconspec.drafters.sar_model import SARDrafterModel, end_aligned_offset, relaxed_causal_mask
    from falconspec.models import load_target
    from falconspec.token_data import iter_token_samples

    target = load_target(args.model)
    directory = drafter_directory(args.model, args.drafter)
    drafter = SARDrafterModel.from_pretrained(directory, target).eval()
    samples = islice((s for _, shard in iter_token_samples(DATA, "heldout") for s in shard), args.samples)
    updates: list[list[float]] = [[] for _ in drafter.layers]

    def keep(index):
        def hook(module, inputs, kwargs, output):
            x = kwargs.get("hidden_states", inputs[0] if inputs else None)
            y = output[0] if isinstance(output, tuple) else output
            updates[index].append(float((y - x).norm() / x.norm()))
        return hook

    hooks = [layer.register_forward_hook(keep(i), with_kwargs=True) for i, layer in enumerate(drafter.layers)]
    with torch.no_grad():
        for sample in samples:
            ids = torch.as_tensor(sample.input_ids)
            features = target.prefill(ids)  # [L, H]
            n = len(ids) - 1  # position j reads (f_j, x_{j+1})
            embeds = drafter.embed(target.model.get_input_embeddings(), ids[1:][None])
            offset = end_aligned_offset(n, drafter.k)  # blocks aligned as drafting aligns them
            drafter(features[None, :n], embeds, torch.arange(n)[None], relaxed_causal_mask(n, 0, drafter.k, offset),
                    block_offset=offset)
    for hook in hooks:
        hook.remove()
    result = {"drafter": str(directory), "samples": len(updates[0]), "layers": [
        {"relative_update": round(sum(u) / len(u), 4),
         "o_proj_rms": round(float(layer.self_attn.o_proj.weight.detach().pow(2).mean().sqrt()), 5),
         "down_proj_rms": round(float(layer.mlp.down_proj.weight.detach().pow(2).mean().sqrt()), 5)}
        for u, layer in zip(updates, drafter.layers)]}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
