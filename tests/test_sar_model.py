import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from falconspec.drafters import make_drafter
from falconspec.drafters.sar import SARDrafter
from falconspec.drafters.sar_model import (
    DrafterMismatchError,
    SARDrafterModel,
    block_last_index,
    check_draft_vocab,
    end_aligned_offset,
    most_frequent_tokens,
    relaxed_causal_allowed,
    relaxed_causal_mask,
)
from falconspec.target import TargetModel
from falconspec.testing import char_tokenizer, tiny_config, tiny_target


def rows(*lines):
    return torch.tensor([[int(c) for c in line.split()] for line in lines], dtype=torch.bool)


# ----------------------------------------------------------------------------- relaxed causal mask
def test_mask_start_and_end_aligned_hand_checked():
    # S=5 new queries, k=2, one cached key (column 0)
    start = relaxed_causal_allowed(5, 1, 2, block_offset=0)[0]
    assert torch.equal(start, rows("1 1 1 0 0 0", "1 1 1 0 0 0", "1 1 1 1 1 0", "1 1 1 1 1 0", "1 1 1 1 1 1"))
    end = relaxed_causal_allowed(5, 1, 2, block_offset=end_aligned_offset(5, 2))[0]
    assert torch.equal(end, rows("1 1 0 0 0 0", "1 1 1 1 0 0", "1 1 1 1 0 0", "1 1 1 1 1 1", "1 1 1 1 1 1"))
    # k=3, S=4, end-aligned: a lone first query, then one full block of three
    k3 = relaxed_causal_allowed(4, 0, 3, block_offset=end_aligned_offset(4, 3))[0]
    assert torch.equal(k3, rows("1 0 0 0", "1 1 1 1", "1 1 1 1", "1 1 1 1"))


@pytest.mark.parametrize("num_queries", [1, 2, 3, 4, 7, 8])
@pytest.mark.parametrize("k", [2, 3])
def test_end_alignment_puts_the_last_k_queries_in_one_block(num_queries, k):
    allowed = relaxed_causal_allowed(num_queries, 3, k, end_aligned_offset(num_queries, k))[0]
    last = min(k, num_queries)
    assert allowed[-last:].all(), "every query of the last block sees the newest position"
    if num_queries > k:
        assert not allowed[-k - 1, -k:].any(), "the query before the last block does not see into it"


def test_k1_is_plain_causal():
    for cached in (0, 4):
        allowed = relaxed_causal_allowed(6, cached, 1, 0)[0]
        expected = torch.cat([torch.ones(6, cached, dtype=torch.bool), torch.ones(6, 6).tril().bool()], dim=1)
        assert torch.equal(allowed, expected)


def test_mask_batch_offsets_padding_and_values():
    mask = relaxed_causal_mask(4, 0, 2, block_offset=torch.tensor([0, 1]),
                               key_padding=torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), dtype=torch.bfloat16)
    assert mask.shape == (2, 1, 4, 4) and mask.dtype == torch.bfloat16
    allowed = mask[:, 0] == 0
    assert torch.equal(allowed[0], relaxed_causal_allowed(4, 0, 2, 0)[0])
    assert torch.equal(allowed[1], relaxed_causal_allowed(4, 0, 2, 1)[0] & torch.tensor([1, 1, 1, 0]).bool())
    assert set(mask.unique().tolist()) == {0.0, torch.finfo(torch.bfloat16).min}
    with pytest.raises(ValueError, match="block_offset"):
        relaxed_causal_mask(4, 0, 2, block_offset=2)


# ----------------------------------------------------------------------------- module
def inputs(target, model, length, seed=0):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, target.vocab_size, (length,), generator=gen)
    hidden = target.prefill(ids)
    embeds = model.embed(target.model.get_input_embeddings(), ids[1:])
    return hidden[:-1][None], embeds[None]


def test_forward_shapes_and_cached_chunks_match_one_pass(llama):
    torch.manual_seed(0)
    model = SARDrafterModel.for_target(llama, k=2).eval()
    features, embeds = inputs(llama, model, 9)  # 8 pairs
    full = model(features, embeds, torch.arange(8)[None], relaxed_causal_mask(8, 0, 2))
    assert full.shape == (1, 8, llama.hidden_size)
    assert model.logits(full, llama.lm_head).shape == (1, 8, llama.vocab_size)
    cache = model.new_cache()
    first = model(features[:, :2], embeds[:, :2], torch.arange(2)[None], relaxed_causal_mask(2, 0, 2), cache)
    rest = model(features[:, 2:], embeds[:, 2:], torch.arange(2, 8)[None], relaxed_causal_mask(6, 2, 2), cache)
    assert cache.length == 8
    torch.testing.assert_close(torch.cat([first, rest], 1), full)


def test_block_last_index():
    assert block_last_index(5, 2, 0).tolist() == [[1, 1, 3, 3, 4]]
    assert block_last_index(5, 2, 1).tolist() == [[0, 2, 2, 4, 4]]
    assert block_last_index(5, 2, torch.tensor([0, 1]), lengths=torch.tensor([3, 5])).tolist() == [
        [1, 1, 2, 2, 2], [0, 2, 2, 4, 4]]
    assert block_last_index(4, 1, 0).tolist() == [[0, 1, 2, 3]]
    assert block_last_index(6, 3, 1).tolist() == [[1, 1, 4, 4, 4, 5]]


def newest_pair_model(target, seed=0):
    """A drafter that reads its blocks' newest pairs, with a trained-looking (non-zero) newest-pair Linear."""
    torch.manual_seed(seed)
    model = SARDrafterModel.for_target(target, k=2, newest_pair=True).eval()
    with torch.no_grad():
        model.newest.weight.normal_(0, 0.05)
    return model


def test_newest_pair_reads_the_blocks_last_pair(llama):
    torch.manual_seed(0)
    plain = SARDrafterModel.for_target(llama, k=2).eval()
    model = SARDrafterModel.for_target(llama, k=2, newest_pair=True).eval()
    model.load_state_dict({**plain.state_dict(), "newest.weight": model.newest.weight}, strict=True)
    features, embeds = inputs(llama, model, 9)
    mask = relaxed_causal_mask(8, 0, 2, 1)
    with pytest.raises(ValueError, match="block_offset"):
        model(features, embeds, torch.arange(8)[None], mask)
    # untrained (zero) it changes nothing; trained, slot j's output moves with its block's last pair only
    torch.testing.assert_close(model(features, embeds, torch.arange(8)[None], mask, block_offset=1),
                               plain(features, embeds, torch.arange(8)[None], mask), rtol=0, atol=0)
    model = newest_pair_model(llama)
    base = model(features, embeds, torch.arange(8)[None], mask, block_offset=1)
    moved = features.clone()
    moved[:, 4] += 1.0  # pair 4 ends the block {3, 4} (offset 1: blocks {0}, {1, 2}, {3, 4}, {5, 6}, {7})
    out = model(moved, embeds, torch.arange(8)[None], mask, block_offset=1)
    changed = (out - base).abs().amax(-1)[0] > 1e-6
    assert changed.tolist() == [False, False, False, True, True, True, True, True]
    hidden_moved = model.fuse(torch.cat([model.embed_norm(embeds), model.feature_norm(moved)], -1))
    assert (hidden_moved[0, 3] == model.fuse(torch.cat([model.embed_norm(embeds), model.feature_norm(features)],
                                                     -1))[0, 3]).all(), "slot 3's own pair did not move"
    with pytest.raises(ValueError, match="k >= 2"):
        SARDrafterModel.for_target(llama, k=1, newest_pair=True)


def test_newest_pair_cached_chunks_match_one_pass(llama):
    """Chunks that keep the blocks of one pass give its outputs. (A cached pair's keys carry the newest pair of the
    block it was computed in, so unlike the plain drafter's first layer they depend on how blocks fell.)"""
    model = newest_pair_model(llama, seed=2)
    features, embeds = inputs(llama, model, 9)
    full = model(features, embeds, torch.arange(8)[None], relaxed_causal_mask(8, 0, 2), block_offset=0)
    cache = model.new_cache()
    first = model(features[:, :2], embeds[:, :2], torch.arange(2)[None], relaxed_causal_mask(2, 0, 2), cache,
                  block_offset=0)
    rest = model(features[:, 2:], embeds[:, 2:], torch.arange(2, 8)[None], relaxed_causal_mask(6, 2, 2), cache,
                 block_offset=0)
    torch.testing.assert_close(torch.cat([first, rest], 1), full)
    other = model(features, embeds, torch.arange(8)[None], relaxed_causal_mask(8, 0, 2, 1), block_offset=1)
    assert not torch.allclose(other, full), "another block alignment, other outputs"


def test_bf16_drafter_takes_a_float32_mask(llama):
    model = SARDrafterModel.for_target(llama, k=2, num_layers=1).to(torch.bfloat16)
    features, embeds = inputs(llama, model, 6)
    out = model(features, embeds, torch.arange(5)[None], relaxed_causal_mask(5, 0, 2, end_aligned_offset(5, 2)))
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_draft_vocab_helpers():
    assert check_draft_vocab([7, 3, 5], 10).tolist() == [3, 5, 7]
    with pytest.raises(ValueError, match="duplicate"):
        check_draft_vocab([3, 3], 10)
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        check_draft_vocab([3, 10], 10)
    counts = torch.tensor([5, 0, 9, 1, 7])
    assert most_frequent_tokens(counts, 2).tolist() == [2, 4]
    assert most_frequent_tokens(counts, 2, always=[1]).tolist() == [1, 2]


# ----------------------------------------------------------------------------- checkpoints
def test_save_load_round_trip(llama, tmp_path):
    torch.manual_seed(1)
    model = SARDrafterModel.for_target(llama, k=2, num_layers=2, draft_vocab=range(10, 60)).eval()
    model.save_pretrained(tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["k"] == 2 and config["num_layers"] == 2 and config["draft_vocab_size"] == 50
    assert (config["hidden_size"], config["vocab_size"]) == (llama.hidden_size, llama.vocab_size)
    assert (config["target_model_type"], config["target_architecture"]) == ("llama", "LlamaForCausalLM")
    loaded = SARDrafterModel.from_pretrained(tmp_path / "d", llama)
    assert torch.equal(loaded.draft_vocab, model.draft_vocab) and loaded.newest is None
    names = set(loaded.state_dict())
    assert not any("embed_tokens" in n or "lm_head" in n for n in names), "target tensors are not stored"
    features, embeds = inputs(llama, model, 8)
    mask = relaxed_causal_mask(7, 0, 2, end_aligned_offset(7, 2))
    expected = model(features, embeds, torch.arange(7)[None], mask)
    torch.testing.assert_close(loaded(features, embeds, torch.arange(7)[None], mask), expected, rtol=0, atol=0)
    torch.testing.assert_close(loaded.logits(expected, llama.lm_head), model.logits(expected, llama.lm_head))
    assert isinstance(make_drafter(str(tmp_path / "d"), llama), SARDrafter)


def test_mismatched_drafter_is_refused(llama, qwen2, tmp_path):
    SARDrafterModel.for_target(llama).save_pretrained(tmp_path / "d")
    with pytest.raises(DrafterMismatchError, match="model type .llama.*model type .qwen2."):
        SARDrafterModel.from_pretrained(tmp_path / "d", qwen2)
    config_file = tmp_path / "d" / "config.json"
    edited = json.loads(config_file.read_text()) | {"target_architecture": "LlamaForTokenClassification"}
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "config.json").write_text(json.dumps(edited))
    (tmp_path / "e" / "model.safetensors").write_bytes((tmp_path / "d" / "model.safetensors").read_bytes())
    with pytest.raises(DrafterMismatchError, match="architecture 'LlamaForTokenClassification'.*'LlamaForCausalLM'"):
        SARDrafterModel.from_pretrained(tmp_path / "e", llama)
    narrow = tiny_target("llama", hidden_size=32)
    with pytest.raises(DrafterMismatchError, match="hidden size 64.*32"):
        make_drafter(str(tmp_path / "d"), narrow)
    torch.manual_seed(0)
    wide_vocab = TargetModel(AutoModelForCausalLM.from_config(tiny_config("llama", vocab_size=150)),
                             char_tokenizer(), name="tiny-llama-150")
    with pytest.raises(DrafterMismatchError, match=f"vocabulary size {llama.vocab_size}.*150"):
        SARDrafter.from_pretrained(tmp_path / "d", wide_vocab)


def test_missing_checkpoint_errors(llama, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        SARDrafterModel.from_pretrained(tmp_path / "nowhere", llama)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        make_drafter(str(tmp_path / "nowhere"), llama)
    SARDrafterModel.for_target(llama).save_pretrained(tmp_path / "d")
    (tmp_path / "d" / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no model.safetensors"):
        SARDrafterModel.from_pretrained(tmp_path / "d", llama)
    with pytest.raises(ValueError, match="unknown drafter"):
        make_drafter("falcon-please", llama)


def test_newest_pair_save_load_round_trip(llama, tmp_path):
    model = newest_pair_model(llama, seed=3)
    model.save_pretrained(tmp_path / "d")
    assert json.loads((tmp_path / "d" / "config.json").read_text())["newest_pair"] is True
    loaded = SARDrafterModel.from_pretrained(tmp_path / "d", llama)
    torch.testing.assert_close(loaded.newest.weight, model.newest.weight, rtol=0, atol=0)


def test_multi_layer_features_round_trip_and_widths(llama, tmp_path):
    """``feature_layers``: the committed positions' features are those layers' inputs side by side (F*H wide, mapped
    to H by ``feature_fc``); the drafter's own features (H wide) skip the map; the layers are stored and checked."""
    torch.manual_seed(2)
    layers = [1, 0]
    model = SARDrafterModel.for_target(llama, k=2, num_layers=1, feature_layers=layers).eval()
    assert model.feature_layers == layers and model.feature_fc.in_features == 2 * llama.hidden_size
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(4, llama.vocab_size, (8,), generator=gen)
    fused = llama.prefill(ids, layers)[:-1][None]  # [1, 7, 2H]
    own = torch.randn(1, 7, llama.hidden_size, generator=gen)  # the drafter's own features
    embeds = model.embed(llama.model.get_input_embeddings(), ids[1:])[None]
    mask, positions = relaxed_causal_mask(7, 0, 2, end_aligned_offset(7, 2)), torch.arange(7)[None]
    mapped = model(model.feature_fc(fused), embeds, positions, mask)
    torch.testing.assert_close(model(fused, embeds, positions, mask), mapped, rtol=0, atol=0)
    assert model(own, embeds, positions, mask).shape == (1, 7, llama.hidden_size)
    with pytest.raises(ValueError, match=f"must be \\[B, S, {llama.hidden_size} or {2 * llama.hidden_size}\\]"):
        model(torch.cat([fused, own], dim=-1), embeds, positions, mask)
    model.save_pretrained(tmp_path / "d")
    config = json.loads((tmp_path / "d" / "config.json").read_text())
    assert config["feature_layers"] == layers and config["num_target_layers"] == llama.config.num_hidden_layers
    loaded = SARDrafterModel.from_pretrained(tmp_path / "d", llama)
    torch.testing.assert_close(loaded(fused, embeds, positions, mask), mapped, rtol=0, atol=0)
    assert SARDrafter(loaded, llama).feature_layers == layers and SARDrafter(loaded, llama).name == "falcon"
    deeper = tiny_target("llama", num_layers=3)
    with pytest.raises(DrafterMismatchError, match="fuses layers \\[1, 0\\] of a 2-layer target"):
        SARDrafterModel.from_pretrained(tmp_path / "d", deeper)
    with pytest.raises(ValueError, match="feature_layers \\[3\\]: need distinct target layer ids in \\[0, 2\\]"):
        SARDrafterModel.for_target(llama, feature_layers=[3])


def test_a_last_layer_drafter_grows_lower_feature_layers_and_drafts_as_before(llama):
    """Layer id L (the target's layer count) is the decoder's output after its final norm, the feature a drafter
    without ``feature_layers`` reads; ``with_feature_layers`` adds lower layers beside it through a ``feature_fc``
    that passes it through, so the grown drafter drafts exactly as before until trained."""
    last = llama.config.num_hidden_layers
    gen = torch.Generator().manual_seed(4)
    ids = torch.randint(4, llama.vocab_size, (9,), generator=gen)
    torch.testing.assert_close(llama.prefill(ids, [last]), llama.prefill(ids), rtol=0, atol=0)
    torch.manual_seed(5)
    model = SARDrafterModel.for_target(llama, k=2, num_layers=1).eval()
    grown = model.with_feature_layers([0, last], last)
    assert grown.feature_layers == [0, last] and grown.feature_fc.in_features == 2 * llama.hidden_size
    embeds = model.embed(llama.model.get_input_embeddings(), ids[1:])[None]
    mask, positions = relaxed_causal_mask(8, 0, 2, end_aligned_offset(8, 2)), torch.arange(8)[None]
    torch.testing.assert_close(grown(llama.prefill(ids, [0, last])[:-1][None], embeds, positions, mask),
                               model(llama.prefill(ids)[:-1][None], embeds, positions, mask))
    with pytest.raises(ValueError, match="only if the highest is 2"):
        model.with_feature_layers([0, 1], last)
    with pytest.raises(ValueError, match="already reads target layers \\[0, 2\\]"):
        grown.with_feature_layers([1, last], last)
