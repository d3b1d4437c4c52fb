import random

import pytest
import torch
from drafters_for_tests import OracleDrafter, RandomTreeDrafter, SelfDrafter

from falconspec import SpeculativeGenerator
from falconspec.drafters import NoDrafter, PromptLookupDrafter
from falconspec.testing import tiny_target


def random_prompts(n, vocab, seed):
    rng = random.Random(seed)
    prompts = []
    for _ in range(n):
        motif = [rng.randrange(4, vocab) for _ in range(rng.randint(2, 5))]
        # repeated motifs give prompt lookup something to find
        prompts.append(motif * rng.randint(1, 4) + [rng.randrange(4, vocab) for _ in range(rng.randint(1, 20))])
    return prompts


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("drafter_name", ["pld", "random", "oracle"])
def test_greedy_speculative_equals_plain_greedy(arch, drafter_name):
    target = tiny_target(arch, seed=4)
    plain = SpeculativeGenerator(target)
    for i, prompt in enumerate(random_prompts(8, target.vocab_size, seed=i_seed(arch))):
        expected = plain.generate(input_ids=prompt, max_new_tokens=40, ignore_eos=True)
        if drafter_name == "pld":
            drafter = PromptLookupDrafter(min_ngram=1, max_ngram=3)
        elif drafter_name == "random":
            drafter = RandomTreeDrafter(target.vocab_size, seed=i)
        else:
            drafter = OracleDrafter(prompt + expected.token_ids, target.vocab_size, seed=i)
        got = SpeculativeGenerator(target, drafter).generate(input_ids=prompt, max_new_tokens=40, ignore_eos=True)
        assert got.token_ids == expected.token_ids, f"prompt {i}"
        assert got.stats.new_tokens == 40 and got.finish_reason == "length"
        if drafter_name == "oracle":
            assert got.stats.cycles < 15, "the truth must be accepted in long runs"
            assert got.stats.mean_accepted_length > 2.5


def i_seed(arch):
    return {"llama": 11, "qwen2": 12}[arch]


def test_stats_add_up(llama):
    prompt = random_prompts(1, llama.vocab_size, seed=3)[0]
    expected = SpeculativeGenerator(llama).generate(input_ids=prompt, max_new_tokens=30, ignore_eos=True)
    assert expected.stats.cycles == 30 and expected.stats.drafted_tokens == 0
    assert expected.stats.mean_accepted_length == 1.0
    drafter = OracleDrafter(prompt + expected.token_ids, llama.vocab_size, depth=4)
    stats = SpeculativeGenerator(llama, drafter).generate(input_ids=prompt, max_new_tokens=30, ignore_eos=True).stats
    assert sum(stats.accepted_per_cycle) == stats.accepted_tokens
    assert stats.accepted_tokens + stats.cycles == 30, "every cycle commits its accepted drafts plus one bonus"
    assert stats.mean_accepted_length == pytest.approx(1 + stats.mean_accepted_drafts)
    assert 0 < stats.acceptance_rate <= 1 and stats.target_forwards == stats.cycles + 1


def test_streaming_equals_blocking_and_stops(llama):
    gen = SpeculativeGenerator(llama, PromptLookupDrafter())
    full = gen.generate("abcabcabc", max_new_tokens=60, ignore_eos=True)
    chunks = list(gen.stream("abcabcabc", max_new_tokens=60, ignore_eos=True))
    assert "".join(c.text for c in chunks) == full.text
    assert sum((c.token_ids for c in chunks), []) == full.token_ids
    assert chunks[-1].stats is not None and all(c.stats is None for c in chunks[:-1])
    # a stop string cuts the text before it
    stop = full.text[10:13]
    cut = gen.generate("abcabcabc", max_new_tokens=60, stop=[stop], ignore_eos=True)
    assert cut.finish_reason == "stop" and cut.text == full.text[:full.text.find(stop)]
    # EOS ends generation and is not returned
    eos_prompt_out = gen.generate("abcabcabc", max_new_tokens=60)
    assert 2 not in eos_prompt_out.token_ids


def test_eos_stops_generation():
    target = tiny_target("llama", seed=4)
    plain = SpeculativeGenerator(target).generate(input_ids=[5, 6, 7], max_new_tokens=20, ignore_eos=True)
    eos = plain.token_ids[5]
    target.model.generation_config.eos_token_id = eos
    out = SpeculativeGenerator(target, PromptLookupDrafter()).generate(input_ids=[5, 6, 7], max_new_tokens=20)
    assert out.finish_reason == "stop" and out.token_ids == plain.token_ids[:plain.token_ids.index(eos)]


def exact_two_token_distribution(target, prompt, params):
    """P(x1, x2) of plain sampling from the target, by enumeration: [vocab, vocab]."""
    with torch.no_grad():
        p1 = params.target_probs(target.model(input_ids=torch.tensor([prompt])).logits[0, -1])
        support = p1.nonzero().flatten().tolist()
        joint = torch.zeros(target.vocab_size, target.vocab_size)
        for x1 in support:
            p2 = params.target_probs(target.model(input_ids=torch.tensor([prompt + [x1]])).logits[0, -1])
            joint[x1] = p1[x1] * p2
    return joint


@pytest.mark.parametrize("drafter_name", ["self", "random", "none"])
def test_sampling_is_lossless_end_to_end(drafter_name):
    """The first two sampled tokens follow the target's own distribution, whatever the drafter proposes."""
    from falconspec.sampling import SamplingParams

    target = tiny_target("llama", seed=5)
    prompt = [1, 40, 41, 42, 43]
    params = SamplingParams(temperature=0.8, top_k=6)
    joint = exact_two_token_distribution(target, prompt, params)
    drafter = {"self": SelfDrafter(target), "random": RandomTreeDrafter(target.vocab_size, seed=3),
               "none": NoDrafter()}[drafter_name]
    gen = SpeculativeGenerator(target, drafter)
    n = 1500
    counts = torch.zeros_like(joint)
    for i in range(n):
        ids = gen.generate(input_ids=prompt, max_new_tokens=2, temperature=0.8, top_k=6, seed=i,
                           ignore_eos=True).token_ids
        counts[ids[0], ids[1]] += 1
    # merge rare cells so the chi-square approximation holds
    expected = joint * n
    common = expected >= 5
    assert counts[joint == 0].sum() == 0, "sampled a pair the target gives zero probability"
    stat = float(((counts[common] - expected[common]) ** 2 / expected[common]).sum())
    rare_obs, rare_exp = float(counts[~common].sum()), float(expected[~common].sum())
    if rare_exp > 0:
        stat += (rare_obs - rare_exp) ** 2 / rare_exp
    df = int(common.sum()) + (rare_exp > 0) - 1
    assert stat < df + 6 * (2 * df) ** 0.5, (stat, df)


def test_sampling_is_reproducible_with_a_seed(llama):
    """The planner carries acceptances from one generation to the next, so the trees differ between these runs;
    the seeded output must not."""
    gen = SpeculativeGenerator(llama, PromptLookupDrafter())
    runs = [gen.generate("hello hello", max_new_tokens=20, temperature=1.0, top_p=0.9, seed=7).token_ids
            for _ in range(3)]
    assert runs[0] == runs[1] == runs[2]


@pytest.mark.parametrize("drafter_name", ["pld", "random", "self", "oracle"])
def test_seeded_sampling_draws_what_plain_sampling_draws(drafter_name):
    """Randomness is keyed by position, so a seeded speculative generation is token-for-token the seeded plain one
    (fp32), whatever the drafter proposes; a drafter that proposes exactly that sample has it all accepted."""
    target = tiny_target("llama", seed=4)
    plain = SpeculativeGenerator(target)
    for i, prompt in enumerate(random_prompts(4, target.vocab_size, seed=9)):
        kwargs = dict(input_ids=prompt, max_new_tokens=30, temperature=0.8, top_p=0.95, seed=100 + i, ignore_eos=True)
        expected = plain.generate(**kwargs).token_ids
        if drafter_name == "pld":
            drafter = PromptLookupDrafter(min_ngram=1, max_ngram=3)
        elif drafter_name == "random":
            drafter = RandomTreeDrafter(target.vocab_size, seed=i)
        elif drafter_name == "self":
            drafter = SelfDrafter(target)
        else:
            drafter = OracleDrafter(prompt + expected, target.vocab_size, seed=i)
        got = SpeculativeGenerator(target, drafter, planner=None).generate(**kwargs)
        assert got.token_ids == expected, f"prompt {i}"
        if drafter_name == "oracle":
            assert got.stats.mean_accepted_length > 2.5, "the sampled truth must be accepted"
    other_seed = plain.generate(**{**kwargs, "seed": 99}).token_ids
    assert other_seed != expected, "the seed must matter"
