"""Sequences own their state: generators sharing one target and one drafter, consumed interleaved, decode exactly
what they decode alone."""

import random

import pytest
import torch

from falconspec import SpeculativeGenerator
from falconspec.drafters.ngram import PromptLookupDrafter
from falconspec.drafters.sar import SARDrafter
from falconspec.drafters.sar_model import SARDrafterModel
from falconspec.testing import tiny_target

NEW = 40


def make_drafter(kind, target):
    if kind == "pld":
        return PromptLookupDrafter(num_nodes=8, depth=4)
    torch.manual_seed(0)
    return SARDrafter(SARDrafterModel.for_target(target, k=2), target, num_nodes=12, depth=4)


def interleaved(streams):
    """Token ids of each stream, pulling one chunk from each in turn until all are done."""
    out = [[] for _ in streams]
    live = list(enumerate(streams))
    while live:
        for entry in list(live):
            i, stream = entry
            chunk = next(stream, None)
            if chunk is None:
                live.remove(entry)
            else:
                out[i].extend(chunk.token_ids)
    return out


@pytest.mark.parametrize("kind", ["falcon", "pld"])
@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.8, "seed": 5}])
def test_two_generators_on_one_target_and_drafter(kind, sampling):
    target = tiny_target(seed=4)
    drafter = make_drafter(kind, target)
    rng = random.Random(1)
    phrase = [rng.randrange(4, target.vocab_size) for _ in range(6)]
    prompts = [phrase * 3 + [rng.randrange(4, target.vocab_size) for _ in range(5)],
               [rng.randrange(4, target.vocab_size) for _ in range(9)] + phrase * 2]
    options = {"max_new_tokens": NEW, "ignore_eos": True, **sampling}
    generators = [SpeculativeGenerator(target, drafter) for _ in prompts]
    solo = [g.generate(input_ids=p, **options).token_ids for g, p in zip(generators, prompts)]
    if not sampling:
        plain = SpeculativeGenerator(target)
        assert solo == [plain.generate(input_ids=p, **options).token_ids for p in prompts]
    together = interleaved([g.stream(input_ids=p, **options) for g, p in zip(generators, prompts)])
    assert together == solo
    # and generations on the target's default cache in between do not disturb them either
    streams = [g.stream(input_ids=p, **options) for g, p in zip(generators, prompts)]
    first = [next(s).token_ids for s in streams]
    target.prefill(torch.tensor(prompts[0]))
    drafter.begin(torch.tensor(prompts[0]), target.prefill(torch.tensor(prompts[0][:-1])))
    rest = interleaved(streams)
    assert [a + b for a, b in zip(first, rest)] == solo


def test_one_generator_streams_one_sequence_at_a_time():
    target = tiny_target(seed=4)
    generator = SpeculativeGenerator(target, PromptLookupDrafter(num_nodes=8, depth=4))
    stream = generator.stream(input_ids=[5, 6, 7], max_new_tokens=NEW, ignore_eos=True)
    next(stream)
    with pytest.raises(RuntimeError, match="already generating"):
        next(generator.stream(input_ids=[5, 6, 7], max_new_tokens=NEW))
    stream.close()


def test_kv_cache_keeps_a_path_like_a_forward_of_the_path_alone():
    from falconspec.tree import Tree

    target = tiny_target(seed=4)
    prompt = torch.tensor([5, 9, 13, 20])
    tree = Tree.merge(21, [[30, 31], [40, 41, 42]])  # nodes: 0 root, 1-2 first branch, 3-5 second
    cache, alone = target.new_cache(), target.new_cache()
    target.prefill(prompt, cache=cache)
    target.forward_tree(tree, cache=cache)
    path = [0, 3, 4]
    target.compact(path, tree.num_nodes, cache=cache)
    assert cache.length == len(prompt) + len(path)
    target.prefill(torch.cat([prompt, torch.tensor([21, 40, 41])]), cache=alone)
    probe = Tree.root_only(50)
    torch.testing.assert_close(target.forward_tree(probe, cache=cache).logits,
                               target.forward_tree(probe, cache=alone).logits)
    cache.crop_to(2)
    assert cache.length == 2
    with pytest.raises(ValueError):
        cache.crop_to(3)
