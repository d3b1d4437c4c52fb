"""Batched speculative decoding: one target forward over several sequences' trees, each sequence decoding exactly
what it decodes alone."""

import random

import pytest
import torch

from falconspec import BatchFullError, BatchGenerator, SpeculativeGenerator
from falconspec.drafters.ngram import PromptLookupDrafter
from falconspec.drafters.sar import SARDrafter
from falconspec.drafters.sar_model import SARDrafterModel
from falconspec.request import RequestError
from falconspec.testing import tiny_target
from falconspec.tree import Tree


@pytest.fixture(scope="module")
def target():
    return tiny_target(seed=4)


def make_drafter(kind, target):
    if kind == "none":
        return None
    if kind == "pld":
        return PromptLookupDrafter(num_nodes=8, depth=4)
    torch.manual_seed(0)
    return SARDrafter(SARDrafterModel.for_target(target, k=2), target, num_nodes=12, depth=4)


def prompts_for(target, n=3, seed=1):
    rng = random.Random(seed)
    phrase = [rng.randrange(4, target.vocab_size) for _ in range(6)]
    lengths = [3, 17, 9, 1, 12][:n]
    return [(phrase * 3)[:k] + [rng.randrange(4, target.vocab_size) for _ in range(k % 4)] for k in lengths]


def run_batch(batch, requests, chunks=None):
    """Add the requests, step until the batch is idle; returns each request's chunks (and fills ``chunks``, seq_id ->
    chunks, for every sequence of the batch)."""
    ids = [batch.add(**r) for r in requests]
    chunks = {} if chunks is None else chunks
    while batch.active:
        for seq_id, chunk in batch.step().items():
            sent = chunks.setdefault(seq_id, [])
            assert not sent or sent[-1].finish_reason is None, "nothing after the last chunk"
            sent.append(chunk)
    return [chunks[i] for i in ids]


def joined(chunks):
    return (sum((c.token_ids for c in chunks), []), "".join(c.text for c in chunks), chunks[-1].finish_reason)


def solo(target, drafter, request):
    out = SpeculativeGenerator(target, drafter, planner=None).generate(**request)
    return out.token_ids, out.text, out.finish_reason


# -------------------------------------------------------------------------------------------- forward_trees
TREES = [Tree.chain(21, [30, 31, 32]), Tree.merge(22, [[30, 31], [40, 41, 42], [30, 50]]), Tree.root_only(5),
         Tree.chain(9, [10])]
PREFIXES = [[5, 9, 13, 20, 7, 8, 9], [5, 6], list(range(4, 16)), []]


def filled_caches(target, prefixes):
    caches = []
    for prefix in prefixes:
        caches.append(target.new_cache())
        target.prefill(torch.tensor(prefix, dtype=torch.long), cache=caches[-1])
    return caches


@pytest.mark.parametrize("feature_layers", [None, [0, 1]])
@pytest.mark.parametrize("rows", [[0, 1, 2, 3], [1, 0], [1], [3, 2]])
def test_forward_trees_equals_forward_tree(target, feature_layers, rows):
    trees, prefixes = [TREES[i] for i in rows], [PREFIXES[i] for i in rows]
    alone, together = filled_caches(target, prefixes), filled_caches(target, prefixes)
    expected = [target.forward_tree(t, feature_layers, cache=c) for t, c in zip(trees, alone)]
    got = target.forward_trees(trees, together, feature_layers)
    if len(rows) == 1:  # and the batched path itself, on one sequence
        batched_alone = filled_caches(target, prefixes)
        got += target._forward_batch(trees, batched_alone, feature_layers)
        expected += expected
        together += batched_alone
        alone += alone
    for want, have in zip(expected, got):
        for name in ("logits", "hidden_states", "features"):
            torch.testing.assert_close(getattr(have, name), getattr(want, name), rtol=1e-4, atol=1e-4)
    # each cache holds its prefix plus its tree, like after forward_tree: compaction and the next forward agree
    for tree, a, b in zip(trees, alone, together):
        assert a.length == b.length
        path = [0] + ([1] if tree.num_nodes > 1 else [])
        target.compact(path, tree.num_nodes, cache=a)
        target.compact(path, tree.num_nodes, cache=b)
        torch.testing.assert_close(target.forward_tree(Tree.root_only(50), cache=b).logits,
                                   target.forward_tree(Tree.root_only(50), cache=a).logits, rtol=1e-4, atol=1e-4)
        if len(rows) == 1:
            break


def test_forward_trees_checks_its_arguments(target):
    with pytest.raises(ValueError, match="one cache per tree"):
        target.forward_trees(TREES[:2], filled_caches(target, PREFIXES[:1]))


# -------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("kind", ["none", "pld", "falcon"])
def test_each_sequence_of_a_batch_decodes_what_it_decodes_alone(target, kind):
    drafter = make_drafter(kind, target)
    requests = [{"input_ids": p, "max_new_tokens": n, "ignore_eos": True}
                for p, n in zip(prompts_for(target), [40, 17, 29])]
    batch = BatchGenerator(target, drafter, planner=None, max_batch=3)
    for request, chunks in zip(requests, run_batch(batch, requests)):
        assert joined(chunks) == solo(target, drafter, request)
        stats = chunks[-1].stats
        assert stats.new_tokens == request["max_new_tokens"] and stats.cycles > 0 and stats.verify_time > 0
    assert batch.active == 0 and batch.step() == {}


def test_seeded_sampling_in_a_batch_draws_what_it_draws_alone(target):
    drafter = make_drafter("pld", target)  # a fixed budget: the same trees as alone, so the same random draws
    requests = [{"input_ids": p, "max_new_tokens": 30, "temperature": t, "seed": s, "ignore_eos": True}
                for p, t, s in zip(prompts_for(target), [0.8, 1.0, 0.0], [5, 6, None])]
    results = BatchGenerator(target, drafter, planner=None).generate(requests)
    for request, result in zip(requests, results):
        assert (result.token_ids, result.text, result.finish_reason) == solo(target, drafter, request)
    assert len({tuple(r.token_ids) for r in results}) == 3


def test_planned_batch_stays_exact_and_plans_for_its_share(target):
    from falconspec.calibrate import Calibration

    drafter = PromptLookupDrafter()  # planned: the batch's calibration plans each sequence's budget
    batch = BatchGenerator(target, drafter, max_batch=4)
    calibration = batch.calibration
    assert isinstance(calibration, Calibration)
    cost, shared = calibration.verify_cost(), calibration.verify_cost(batch_size=3)
    assert shared(4) == pytest.approx(cost(12) / 3)
    with pytest.raises(ValueError, match="batch_size"):
        calibration.verify_cost(batch_size=0)
    requests = [{"input_ids": p, "max_new_tokens": 24, "ignore_eos": True} for p in prompts_for(target)]
    plain = [solo(target, None, r) for r in requests]
    first = batch.add(**requests[0])
    chunks = {first: list(batch.step().values())}
    assert batch._planned_for[first] == 1
    ids = [batch.add(**r) for r in requests[1:]]
    for seq_id, chunk in batch.step().items():
        chunks.setdefault(seq_id, []).append(chunk)
    assert set(batch._planned_for.values()) == {3}  # two joined: every planner plans for its share of 3
    run_batch(batch, [], chunks)
    rest = [chunks[i] for i in ids]
    assert batch.active == 0
    assert [joined(c) for c in [chunks[first]] + rest] == plain
    assert all(c[-1].stats.plans for c in rest)  # each sequence's own planner recorded its plans


# -------------------------------------------------------------------------------------------- joining and leaving
def test_sequences_join_between_steps_and_cancel_frees_a_slot(target):
    drafter = make_drafter("pld", target)
    prompts = prompts_for(target, 4)
    requests = [{"input_ids": p, "max_new_tokens": 30, "ignore_eos": True} for p in prompts]
    batch = BatchGenerator(target, drafter, planner=None, max_batch=2)
    a, b = batch.add(**requests[0]), batch.add(**requests[1])
    with pytest.raises(BatchFullError):
        batch.add(**requests[2])
    chunks = {a: [], b: []}
    for _ in range(3):
        for seq_id, chunk in batch.step().items():
            chunks[seq_id].append(chunk)
    batch.cancel(b)
    batch.cancel(12345)  # unknown: no-op
    assert batch.active == 1
    c = batch.add(**requests[2])  # the freed slot, joining mid-run
    assert c not in (a, b)
    chunks[c] = []
    step = 0
    while batch.active:
        step += 1
        if step == 2:  # a newcomer that never ran can be cancelled too
            d = batch.add(**requests[3]) if batch.active < 2 else None
            if d is not None:
                batch.cancel(d)
        for seq_id, chunk in batch.step().items():
            chunks[seq_id].append(chunk)
    assert b in chunks and all(ch.finish_reason is None for ch in chunks[b])  # cancelled: no last chunk
    assert joined(chunks[a]) == solo(target, drafter, requests[0])
    assert joined(chunks[c]) == solo(target, drafter, requests[2])


def test_eos_and_stop_strings_finish_one_sequence_while_the_others_go_on():
    target = tiny_target("llama", seed=4)
    prompt = [5, 6, 7]
    free = SpeculativeGenerator(target).generate(input_ids=prompt, max_new_tokens=40, ignore_eos=True)
    target.model.generation_config.eos_token_id = free.token_ids[6]
    drafter = make_drafter("pld", target)
    requests = [{"input_ids": prompt, "max_new_tokens": 40},  # ends at EOS
                {"input_ids": prompt, "max_new_tokens": 40, "ignore_eos": True},
                {"input_ids": prompt, "max_new_tokens": 40, "ignore_eos": True, "stop": free.text[12:14]}]
    finished_at = {}
    batch = BatchGenerator(target, drafter, planner=None)
    ids = [batch.add(**r) for r in requests]
    chunks = {i: [] for i in ids}
    step = 0
    while batch.active:
        step += 1
        for seq_id, chunk in batch.step().items():
            chunks[seq_id].append(chunk)
            if chunk.finish_reason:
                finished_at[seq_id] = step
    results = [joined(chunks[i]) for i in ids]
    assert results == [solo(target, drafter, r) for r in requests]
    assert [r[2] for r in results] == ["stop", "length", "stop"]
    assert finished_at[ids[0]] < finished_at[ids[1]] and finished_at[ids[2]] < finished_at[ids[1]]


def test_invalid_requests_change_nothing(target):
    batch = BatchGenerator(target, make_drafter("pld", target), planner=None, max_batch=2)
    good = {"input_ids": prompts_for(target)[0], "max_new_tokens": 12, "ignore_eos": True}
    first = batch.add(**good)
    for bad in ({"input_ids": [5, 6], "max_new_tokens": 0}, {"prompt": "hi", "input_ids": [5]},
                {"input_ids": [5, 10**6]}, {"input_ids": [5], "temperature": -1.0},
                {"input_ids": [5], "max_new_tokens": target.max_context}):
        with pytest.raises(RequestError):
            batch.add(**bad)
        assert batch.active == 1
    second = batch.add(**good)
    assert second == first + 1
    with pytest.raises(RequestError):  # generate checks every request before running any
        BatchGenerator(target, None).generate([good, {"input_ids": []}])
    results = {}
    while batch.active:
        results.update({k: v for k, v in batch.step().items() if v.finish_reason})
    assert results[first].stats.new_tokens == results[second].stats.new_tokens == 12


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "8"])
def test_max_batch_is_checked(target, value):
    with pytest.raises(ValueError, match="max_batch"):
        BatchGenerator(target, None, max_batch=value)


def test_generate_queues_more_requests_than_fit(target):
    drafter = make_drafter("pld", target)
    requests = [{"input_ids": p, "max_new_tokens": n, "ignore_eos": True}
                for p, n in zip(prompts_for(target, 5), [10, 20, 5, 15, 8])]
    batch = BatchGenerator(target, drafter, planner=None, max_batch=2)
    results = batch.generate(requests)
    assert [(r.token_ids, r.text, r.finish_reason) for r in results] == [solo(target, drafter, r) for r in requests]
    assert batch.active == 0
    batch.add(**requests[0])
    with pytest.raises(RuntimeError, match="idle"):
        batch.generate(requests)
