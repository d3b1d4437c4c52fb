"""The model adapter: output processing (Gemma-2 soft-capping) exact, sliding windows exact within the window or
refused, unknown output processing and cache layouts refused."""

import pytest
import torch
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

from falconspec.adapter import UnsupportedModelError, adapt
from falconspec.drafters import PromptLookupDrafter
from falconspec.generate import SpeculativeGenerator
from falconspec.sampling import SamplingParams
from falconspec.target import TargetModel
from falconspec.testing import char_tokenizer, tiny_config
from falconspec.tree import Tree
from falconspec.verify import sample_verify

SMALL = {"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
         "num_key_value_heads": 2, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
CAP = 2.0


def gemma2(window: int = 256, context: int = 256, cap: float | None = CAP, seed: int = 0) -> TargetModel:
    tokenizer = char_tokenizer()
    config = Gemma2Config(vocab_size=len(tokenizer), head_dim=16, max_position_embeddings=context,
                          sliding_window=window, final_logit_softcapping=cap, initializer_range=0.3, **SMALL)
    torch.manual_seed(seed)
    return TargetModel(Gemma2ForCausalLM(config).eval(), tokenizer, name="tiny-gemma2")


def mistral(window: int, context: int = 256, max_context: int | None = None) -> TargetModel:
    tokenizer = char_tokenizer()
    config = MistralConfig(vocab_size=len(tokenizer), max_position_embeddings=context, sliding_window=window,
                           initializer_range=0.2, **SMALL)
    torch.manual_seed(0)
    return TargetModel(MistralForCausalLM(config).eval(), tokenizer, name="tiny-mistral", max_context=max_context)


@pytest.fixture(scope="module")
def capped():
    return gemma2()


def own_logits(target, ids) -> torch.Tensor:
    with torch.no_grad():
        return target.model(input_ids=torch.tensor(ids)[None]).logits[0]


def own_greedy(target, ids, n) -> list[int]:
    """Plain greedy decoding by the Hugging Face model's own forward, recomputed from scratch every step."""
    ids = list(ids)
    for _ in range(n):
        ids.append(int(own_logits(target, ids)[-1].argmax()))
    return ids[-n:]


def test_the_soft_cap_is_applied_and_matters(capped):
    assert capped.adapter.windowed and capped.max_context == 256
    prompt = [1, 10, 20, 30, 40, 50]
    capped.prefill(torch.tensor(prompt[:-1]))
    tree = Tree.merge(prompt[-1], [[5, 6, 7], [5, 8], [9, 10]])
    out = capped.forward_tree(tree)
    assert out.logits.abs().max() <= CAP
    for path in tree.leaf_paths():
        expected = own_logits(capped, prompt[:-1] + [tree.tokens[i] for i in path])[len(prompt) - 1:]  # root first
        torch.testing.assert_close(out.logits[path], expected, atol=1e-5, rtol=1e-5)
    raw = capped.lm_head(out.hidden_states)  # without the cap the distribution is far off
    assert (raw.softmax(-1) - out.logits.softmax(-1)).abs().sum(-1).min() > 0.2


def test_speculative_greedy_equals_the_models_own_greedy(capped):
    prompt = capped.tokenizer.encode("abcabcabcabc the cat the cat the cat")
    generator = SpeculativeGenerator(capped, PromptLookupDrafter(num_nodes=8, depth=4), planner=None)
    result = generator.generate(input_ids=prompt, max_new_tokens=40, ignore_eos=True)
    assert result.stats.accepted_tokens > 0  # the drafts were used
    assert result.token_ids == own_greedy(capped, prompt, 40)


def test_sampled_tokens_follow_the_capped_softmax(capped):
    """The engine's verification probabilities are the model's own softmax, and tokens sampled through
    verification follow it (chi-square over a few thousand draws at one position)."""
    params = SamplingParams(temperature=1.0, seed=0)
    prompt = [1, 10, 20, 30, 40]
    capped.prefill(torch.tensor(prompt[:-1]))
    tree = Tree.merge(prompt[-1], [[7], [9], [11]])
    probs = params.target_probs(capped.forward_tree(tree).logits)
    expected = own_logits(capped, prompt)[-1].float().softmax(-1)
    torch.testing.assert_close(probs[0], expected, atol=1e-6, rtol=1e-5)
    generator = torch.Generator().manual_seed(0)
    n = 4000
    counts = torch.zeros_like(expected)
    for _ in range(n):
        counts[sample_verify(tree, probs, torch.rand(2, generator=generator, dtype=torch.float64)).tokens[0]] += 1
    big = expected * n >= 5  # chi-square over the tokens expected 5+ times, the rest pooled
    observed = torch.cat([counts[big], counts[~big].sum()[None]])
    wanted = torch.cat([expected[big], expected[~big].sum()[None]]) * n
    chi2 = float(((observed - wanted) ** 2 / wanted.clamp_min(1e-9)).sum())
    df = int(big.sum())
    assert chi2 < df + 5 * (2 * df) ** 0.5, (chi2, df)
    assert 0.5 * float((counts / n - expected).abs().sum()) < 0.1
    with torch.no_grad():
        hidden = capped.decoder(input_ids=torch.tensor(prompt)[None]).last_hidden_state[0, -1]
        uncapped = capped.lm_head(hidden).softmax(-1)
    assert 0.5 * float((counts / n - uncapped).abs().sum()) > 0.15  # the test tells capped from uncapped


def test_a_window_shorter_than_the_context_is_refused_with_what_to_do():
    with pytest.raises(UnsupportedModelError, match=r"tiny-mistral.*window of 16 tokens.*max_context <= 16"):
        mistral(window=16)
    with pytest.raises(UnsupportedModelError, match="window of 16"):
        mistral(window=16, max_context=17)
    with pytest.raises(UnsupportedModelError, match="window of 32"):
        gemma2(window=32)


def test_within_the_window_a_sliding_model_is_exact():
    target = mistral(window=24, max_context=24)
    assert target.max_context == 24
    prompt = [1, 10, 20, 30, 40, 50]
    generator = SpeculativeGenerator(target, PromptLookupDrafter(num_nodes=6, depth=3), planner=None)
    result = generator.generate(input_ids=prompt, max_new_tokens=18, ignore_eos=True)
    assert result.token_ids == own_greedy(target, prompt, 18)
    with pytest.raises(ValueError, match="context of 24"):
        generator.generate(input_ids=prompt, max_new_tokens=19)


def test_unknown_output_processing_is_refused():
    config = tiny_config("llama")
    config.logits_scaling = 4.0  # granite's name on a llama: falconspec cannot know what it does here
    with pytest.raises(UnsupportedModelError, match="logits_scaling=4.0"):
        adapt(LlamaForCausalLM(config), "odd-llama")
    config.logits_scaling = 1.0  # neutral values are fine
    assert adapt(LlamaForCausalLM(config), "odd-llama").ops == ()


class ScaledLlama(LlamaForCausalLM):
    """Output processing in code, not in the config."""

    def forward(self, *args, **kwargs):
        out = super().forward(*args, **kwargs)
        out.logits = out.logits * 3
        return out


def test_output_processing_in_code_is_caught_at_load():
    torch.manual_seed(0)
    with pytest.raises(UnsupportedModelError, match="differ from the model's own forward"):
        TargetModel(ScaledLlama(tiny_config("llama")), char_tokenizer(), name="scaled")


def test_other_cache_layouts_are_refused():
    model = LlamaForCausalLM(tiny_config("llama"))
    model.config.layer_types = ["full_attention", "linear_attention"]
    with pytest.raises(UnsupportedModelError, match="'linear_attention' layers"):
        adapt(model, "hybrid-llama")
    model.config.layer_types = None
    model.generation_config.cache_implementation = "quantized"
    with pytest.raises(UnsupportedModelError, match="'quantized' KV cache"):
        adapt(model, "q-llama")
    model.generation_config.cache_implementation = None
    model._is_stateful = True
    with pytest.raises(UnsupportedModelError, match="recurrent state"):
        adapt(model, "rnn")
