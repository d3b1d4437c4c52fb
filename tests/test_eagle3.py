import random

import pytest
import torch
from safetensors.torch import load_file

from falconspec import SpeculativeGenerator
from falconspec.drafters import load_checkpoint
from falconspec.drafters.eagle3_model import Eagle3DrafterModel, default_feature_layers
from falconspec.drafters.sar import SARDrafter
from falconspec.drafters.sar_model import DrafterMismatchError, relaxed_causal_mask
from falconspec.testing import tiny_target
from falconspec.tree import Tree

from drafters_for_tests import capture_sequences

NEW = 24


def test_target_returns_the_inputs_of_the_chosen_layers():
    target = tiny_target(seed=1, num_layers=4)
    ids = torch.arange(4, 14)
    reference = target.model(ids[None], output_hidden_states=True)
    # transformers' hidden_states[i] is the input of decoder layer i (i < L)
    expected = torch.cat([reference.hidden_states[i][0] for i in (0, 3, 1)], dim=-1)
    torch.testing.assert_close(target.prefill(ids, [0, 3, 1]), expected)
    out = target.forward_tree(Tree.chain(14, [15, 16]), [0, 3, 1])
    full = target.model(torch.arange(4, 17)[None], output_hidden_states=True)
    # cached vs one-pass attention round differently: close, not bitwise
    expected = torch.cat([full.hidden_states[i][0, 10:] for i in (0, 3, 1)], -1)
    torch.testing.assert_close(out.features, expected, atol=1e-4, rtol=1e-4)
    assert [h for h in target.decoder.layers[0]._forward_pre_hooks.values()] == [], "hooks are removed"
    # id L (4): the output after the final norm, transformers' hidden_states[L]
    torch.testing.assert_close(target.prefill(ids, [4, 0]), torch.cat([reference.hidden_states[i][0] for i in (4, 0)],
                                                                      dim=-1))
    assert not target.decoder._forward_hooks, "hooks are removed"
    with pytest.raises(ValueError, match="feature layers \\[5\\]: need distinct target layer ids in \\[0, 4\\]"):
        target.prefill(ids, [5])
    # a layer named twice is handed over at each place it is named
    torch.testing.assert_close(target.prefill(ids, [3, 3]), torch.cat([reference.hidden_states[3][0]] * 2, dim=-1))


def test_default_feature_layers():
    assert default_feature_layers(30) == [2, 15, 27]
    assert default_feature_layers(4) == [0, 2, 3]
    assert default_feature_layers(2) == [0, 1]


def test_feature_layers_flag_is_parsed_and_checked_against_the_target():
    from falconspec.train_common import resolve_feature_layers

    assert resolve_feature_layers("", 30) is None
    assert resolve_feature_layers("auto", 30) == [2, 15, 27]
    assert resolve_feature_layers("2,15,30", 30) == [2, 15, 30]
    with pytest.raises(ValueError, match="takes 'auto' or comma-separated layer ids, got '2,x'"):
        resolve_feature_layers("2,x", 30)
    for bad in ("2,2", "31", "-1,3"):
        with pytest.raises(ValueError, match="--feature-layers \\[.*\\]: need distinct target layer ids in \\[0, 30\\]"):
            resolve_feature_layers(bad, 30)


def test_state_dict_uses_eagle3_names():
    target = tiny_target(seed=0, num_layers=4)
    model = Eagle3DrafterModel.for_target(target, draft_vocab=range(10, 60))
    hidden = target.hidden_size
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes["fc.weight"] == (hidden, 3 * hidden)
    assert shapes["midlayer.self_attn.q_proj.weight"][1] == 2 * hidden
    assert shapes["lm_head.weight"] == (50, hidden)
    assert shapes["d2t"] == (50,) and shapes["t2d"] == (target.vocab_size,)
    assert {n.split(".")[0] for n in shapes} == {"fc", "midlayer", "norm", "lm_head", "d2t", "t2d"}
    assert model.draft_vocab.tolist() == list(range(10, 60))
    assert int(model.t2d.sum()) == 50 and bool(model.t2d[10]) and not bool(model.t2d[9])


def prompts(n, vocab, seed):
    rng = random.Random(seed)
    return [[rng.randrange(4, vocab) for _ in range(rng.randint(1, 20))] for _ in range(n)]


@pytest.mark.parametrize("options", [{}, {"dtype": torch.bfloat16, "draft_vocab": range(20, 90)}])
def test_greedy_output_equals_plain_greedy(options):
    target = tiny_target(seed=4, num_layers=4)
    torch.manual_seed(0)
    dtype = options.get("dtype", torch.float32)
    model = Eagle3DrafterModel.for_target(target, draft_vocab=options.get("draft_vocab")).to(dtype)
    drafter = SARDrafter(model, target, num_nodes=12, depth=5)
    assert drafter.name == "eagle3" and drafter.feature_layers == model.feature_layers
    plain, spec = SpeculativeGenerator(target), SpeculativeGenerator(target, drafter)
    sequences = capture_sequences(drafter)
    drafted = 0
    for prompt in prompts(6, target.vocab_size, seed=1):
        expected = plain.generate(input_ids=prompt, max_new_tokens=NEW, ignore_eos=True)
        got = spec.generate(input_ids=prompt, max_new_tokens=NEW, ignore_eos=True)
        assert got.token_ids == expected.token_ids
        assert sequences[-1].cache_len == len(prompt) + NEW - 1
        drafted += got.stats.drafted_tokens
    assert drafted > 0


def test_checkpoint_round_trip_and_mismatch(tmp_path):
    target = tiny_target(seed=0, num_layers=4)
    model = Eagle3DrafterModel.for_target(target, draft_vocab=range(8, 100))
    model.save_pretrained(tmp_path / "d")
    assert set(load_file(str(tmp_path / "d" / "model.safetensors"))) == set(model.state_dict())
    drafter = load_checkpoint(tmp_path / "d", target)
    assert drafter.name == "eagle3"
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(drafter.model.state_dict()[name], tensor)
    deeper = tiny_target(seed=0, num_layers=5)
    with pytest.raises(DrafterMismatchError, match="layers"):
        load_checkpoint(tmp_path / "d", deeper)


def test_forward_accepts_target_and_own_features():
    target = tiny_target(seed=0, num_layers=4)
    model = Eagle3DrafterModel.for_target(target)
    hidden = target.hidden_size
    mask = relaxed_causal_mask(3, 0, 1)
    embeds = torch.randn(1, 3, hidden)
    positions = torch.arange(3)[None]
    assert model(torch.randn(1, 3, 3 * hidden), embeds, positions, mask).shape == (1, 3, hidden)
    assert model(torch.randn(1, 3, hidden), embeds, positions, mask).shape == (1, 3, hidden)
    with pytest.raises(ValueError, match="features must be"):
        model(torch.randn(1, 3, 2 * hidden), embeds, positions, mask)


def test_training_time_test_matches_drafting():
    """Step s of training-time test at position j sees exactly what drafting depth s + 1 sees after a real prefix
    ending at j - s: same inputs, same keys, so the same output."""
    from falconspec.data import Sample
    from falconspec.train_eagle3 import Eagle3TrainConfig, target_pass, ttt_mask

    target = tiny_target(seed=3, num_layers=4)
    torch.manual_seed(1)
    model = Eagle3DrafterModel.for_target(target).eval()
    ids = list(range(5, 17))
    batch = target_pass(target, [Sample("a", ids, [1] * len(ids))], model.feature_layers, 64)
    S = len(ids) - 1
    embeds = model.embed(target.model.get_input_embeddings().weight, batch["ids"][:, 1:])
    positions = torch.arange(S)[None]
    cache = model.new_cache()
    features, outs = batch["features"][:, :S], []
    for step in range(3):
        out = model(features, embeds, positions, ttt_mask(step, batch["lengths"], S + 1, torch.float32), cache)
        outs.append(out[0])
        features = torch.cat([out[:, :1] * 0, out[:, :-1]], dim=1)
    j = 7
    for depth in range(3):  # drafting: real pairs 0..j-depth, then depth own steps
        prefix = j - depth
        cache = model.new_cache()
        real = model(batch["features"][:, : prefix + 1], embeds[:, : prefix + 1], positions[:, : prefix + 1],
                     relaxed_causal_mask(prefix + 1, 0, 1), cache)
        own = real[:, -1:]
        for t in range(1, depth + 1):
            p = prefix + t
            own = model(own, embeds[:, p:p + 1], positions[:, p:p + 1], relaxed_causal_mask(1, p, 1), cache)
        torch.testing.assert_close(own[0, 0], outs[depth][j], atol=1e-5, rtol=1e-5)
    assert Eagle3TrainConfig(out="x").ttt_steps == 3
