"""Checkpoint averaging of drafters (recipes/average_drafters.py)."""
import json

import pytest
import torch
from safetensors.torch import load_file

from falconspec.drafters.sar_model import SARDrafterModel
from repo_scripts import load_script

average_drafters = load_script("recipes/average_drafters.py")


def saved(target, directory, seed, **options):
    torch.manual_seed(seed)
    model = SARDrafterModel.for_target(target, k=2, draft_vocab=range(10, 60), **options)
    for parameter in model.parameters():  # zero-initialised projections too, so every tensor differs
        parameter.data.normal_()
    model.save_pretrained(directory)
    (directory / "recipe.json").write_text(json.dumps({"note": f"seed {seed}"}))
    return load_file(directory / "model.safetensors")


def test_weighted_mean_loads_and_keeps_the_inputs_recipes(llama, tmp_path):
    a, b = saved(llama, tmp_path / "a", 0), saved(llama, tmp_path / "b", 1)
    average_drafters.main([str(tmp_path / "a"), str(tmp_path / "b"), "--weights", "1", "3", "--out",
                           str(tmp_path / "avg")])
    mean = load_file(tmp_path / "avg" / "model.safetensors")
    assert set(mean) == set(a)
    for name, tensor in mean.items():
        if tensor.is_floating_point():
            torch.testing.assert_close(tensor, 0.25 * a[name] + 0.75 * b[name])
        else:
            assert torch.equal(tensor, a[name])  # the draft vocabulary's ids, not averaged
    loaded = SARDrafterModel.from_pretrained(tmp_path / "avg", llama)
    assert loaded.config == SARDrafterModel.from_pretrained(tmp_path / "a", llama).config
    recipe = json.loads((tmp_path / "avg" / "recipe.json").read_text())
    assert [(i["weight"], i["recipe"]["note"]) for i in recipe["averaged_from"]] == [(1.0, "seed 0"), (3.0, "seed 1")]


def test_other_architectures_and_vocabularies_are_refused(llama, tmp_path):
    saved(llama, tmp_path / "a", 0)
    saved(llama, tmp_path / "wider", 1, newest_pair=True)
    with pytest.raises(SystemExit, match="configs differ"):
        average_drafters.main([str(tmp_path / "a"), str(tmp_path / "wider"), "--out", str(tmp_path / "x")])
    torch.manual_seed(2)
    SARDrafterModel.for_target(llama, k=2, draft_vocab=range(20, 70)).save_pretrained(tmp_path / "vocab")
    with pytest.raises(SystemExit, match="draft_vocab differs"):
        average_drafters.main([str(tmp_path / "a"), str(tmp_path / "vocab"), "--out", str(tmp_path / "x")])
    with pytest.raises(SystemExit, match="not a drafter directory"):
        average_drafters.main([str(tmp_path / "a"), str(tmp_path / "missing"), "--out", str(tmp_path / "x")])
    assert not (tmp_path / "x").exists()
