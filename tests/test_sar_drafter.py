import math
import random

import pytest
import torch

from falconspec import SpeculativeGenerator
from falconspec.drafters.sar import SARDrafter
from falconspec.drafters.sar_model import SARDrafterModel, end_aligned_offset, relaxed_causal_mask
from falconspec.drafters.trees import STATIC_TREES, DraftTreeBuilder, check_rank_paths
from falconspec.testing import tiny_target
from falconspec.tree import TreeError

from drafters_for_tests import capture_sequences

NEW = 30


def prompts(n, vocab, seed):
    rng = random.Random(seed)
    lengths = [1, 2, 3] + [rng.randint(4, 25) for _ in range(n - 3)]  # < k+1 pairs: nothing to draft at first
    return [[rng.randrange(4, vocab) for _ in range(length)] for length in lengths]


def drafter_for(target, k, seed=0, dtype=torch.float32, draft_vocab=None, newest_pair=False, chain_slots=False,
                newest_slots=False, reversed_slots=False, chain_attention=False, feature_layers=None, **options):
    """Trees larger than the CPU default (16 nodes, depth 6) unless the test says otherwise: more paths to check.
    ``newest_pair``, ``chain_slots``, ``chain_attention``: their zero-initialised weights get random values, so that
    they matter; ``newest_slots`` brings the chain with it; ``feature_layers``: multi-layer features."""
    torch.manual_seed(seed)
    model = SARDrafterModel.for_target(target, k=k, draft_vocab=draft_vocab, newest_pair=newest_pair,
                                       chain_slots=chain_slots or newest_slots, newest_slots=newest_slots,
                                       reversed_slots=reversed_slots, chain_attention=chain_attention,
                                       feature_layers=feature_layers)
    chain_slots = chain_slots or newest_slots
    with torch.no_grad():
        if newest_pair:
            model.newest.weight.normal_(0, 0.05)
        if chain_slots:
            model.chain.down.weight.normal_(0, 0.5)
        if chain_attention:
            model.chain_attention.out.weight.normal_(0, 0.5)
    return SARDrafter(model.to(dtype), target, **{"num_nodes": 16, "depth": 6, **options})


# ----------------------------------------------------------------------------- lossless output, in sync
@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("k", [2, 1])
def test_greedy_output_equals_plain_greedy(arch, k):
    target = tiny_target(arch, seed=4)
    plain = SpeculativeGenerator(target)
    drafter = drafter_for(target, k)
    assert drafter.name == ("falcon" if k == 2 else "eagle")
    spec = SpeculativeGenerator(target, drafter)
    sequences = capture_sequences(drafter)
    drafted = 0
    for prompt in prompts(8, target.vocab_size, seed=k):
        expected = plain.generate(input_ids=prompt, max_new_tokens=NEW, ignore_eos=True)
        got = spec.generate(input_ids=prompt, max_new_tokens=NEW, ignore_eos=True)
        assert got.token_ids == expected.token_ids, f"prompt {prompt}"
        assert sequences[-1].cache_len == len(prompt) + NEW - 1, "one cached pair per committed token but the root"
        drafted += got.stats.drafted_tokens
    assert drafted > 0


@pytest.mark.parametrize("options", [
    {"dtype": torch.bfloat16, "draft_vocab": range(20, 90)},
    {"newest_pair": True},
    {"chain_slots": True},
    {"chain_slots": True, "newest_pair": True, "static_tree": "k2-16"},
    {"newest_slots": True},
    {"newest_slots": True, "static_tree": "k2-16"},
    {"newest_slots": True, "chain_attention": True},
    {"newest_slots": True, "chain_attention": True, "static_tree": "k2-16"},
    {"reversed_slots": True},
    {"reversed_slots": True, "chain_slots": True, "newest_pair": True},
    {"static_tree": "k2-16"},
    {"num_nodes": 6, "depth": 3, "top_k": 2, "branches": 1},
    {"feature_layers": [1, 0]},
    {"feature_layers": [0, 1], "chain_slots": True, "newest_pair": True, "static_tree": "k2-16"},
    {"feature_layers": [0, 2]},  # 2: the output after the final norm (the tiny target has 2 layers)
])
def test_greedy_equality_with_options(llama, options):
    plain = SpeculativeGenerator(llama)
    drafter = drafter_for(llama, 2, seed=3, **options)
    spec = SpeculativeGenerator(llama, drafter)
    for prompt in prompts(5, llama.vocab_size, seed=5):
        expected = plain.generate(input_ids=prompt, max_new_tokens=NEW, ignore_eos=True)
        assert spec.generate(input_ids=prompt, max_new_tokens=NEW, ignore_eos=True).token_ids == expected.token_ids
    layers = options.get("feature_layers")
    assert drafter.tail_features.shape[-1] == llama.hidden_size * len(layers or [None]), \
        "a multi-layer drafter is given the fused layers' inputs of the committed positions"


def test_a_drafter_without_a_budget_is_planned(llama):
    torch.manual_seed(0)
    model = SARDrafterModel.for_target(llama, k=2)
    assert SARDrafter(model, llama).planned
    assert not SARDrafter(model, llama, num_nodes=6).planned and not SARDrafter(model, llama, depth=2).planned
    assert not SARDrafter(model, llama, static_tree="k2-16").planned
    drafter = SARDrafter(model, llama)
    drafter.set_budget(4, 2)  # what the generator's planner does before every propose
    ids = torch.tensor(prompts(4, llama.vocab_size, seed=9)[3])
    drafter.begin(ids, llama.prefill(ids[:-1]))
    tree = drafter.propose(ids, max_depth=10)
    assert tree.num_nodes <= 4 and tree.max_depth <= 2


def test_sampling_runs_and_is_seeded(llama):
    spec = SpeculativeGenerator(llama, drafter_for(llama, 2))
    for prompt in prompts(4, llama.vocab_size, seed=7):
        first = spec.generate(input_ids=prompt, max_new_tokens=NEW, temperature=0.9, top_p=0.95, seed=3,
                              ignore_eos=True)
        again = spec.generate(input_ids=prompt, max_new_tokens=NEW, temperature=0.9, top_p=0.95, seed=3,
                              ignore_eos=True)
        assert len(first.token_ids) == NEW and first.token_ids == again.token_ids


def test_tree_shape_vocab_and_kv_discarded(llama):
    vocab = list(range(30, 80))
    drafter = drafter_for(llama, 2, draft_vocab=vocab, num_nodes=12, depth=4)
    ids = torch.tensor(prompts(4, llama.vocab_size, seed=9)[3])
    drafter.begin(ids, llama.prefill(ids[:-1]))
    cached = drafter.cache_len
    tree = drafter.propose(ids, max_depth=10)
    assert tree.tokens[0] == int(ids[-1]) and tree.num_nodes == 12 and tree.max_depth <= 4
    assert set(tree.tokens[1:]) <= set(vocab), "tokens outside the draft vocabulary are never drafted"
    assert drafter.cache_len == cached, "expansion KV is cropped after the cycle"
    assert drafter.propose(ids, max_depth=1).max_depth == 1
    assert drafter.propose(ids, max_depth=0).num_nodes == 1
    with pytest.raises(RuntimeError, match="out of sync"):
        drafter.propose(ids[:-1], max_depth=4)


@pytest.mark.parametrize("newest_pair", [False, True])
def test_expansion_equals_one_pass_over_the_branch(llama, newest_pair):
    """Update and expansion outputs equal one fresh forward over committed pairs + ancestor blocks + own block."""
    drafter = drafter_for(llama, 2, depth=6, branches=3, newest_pair=newest_pair)
    calls = []
    forward = drafter._forward

    def spy(features, tokens, positions, mask, block_offset):
        out = forward(features, tokens, positions, mask, block_offset)
        calls.append((features, tokens, out))
        return out

    ids = torch.tensor(prompts(4, llama.vocab_size, seed=2)[3][:11])
    hidden = llama.prefill(ids[:-1])
    drafter.begin(ids, hidden)
    drafter._forward = spy
    drafter.propose(ids, max_depth=6)
    (f1, t1, o1), (f2, t2, o2) = calls  # two expansion passes
    assert len(t1) == 6 and len(t2) == 6, "three branches of two positions each"
    for b in range(3):
        rows2 = slice(2 * b, 2 * b + 2)
        parent = next(i for i in range(3) if torch.equal(f2[rows2], o1[2 * i:2 * i + 2]))
        rows1 = slice(2 * parent, 2 * parent + 2)
        torch.testing.assert_close(f1[rows1], drafter.block)
        features = torch.cat([hidden, f1[rows1], f2[rows2]])
        tokens = torch.cat([ids[1:], t1[rows1], t2[rows2]])
        n = len(tokens)
        model = drafter.model
        fresh = model(features[None], model.embed(drafter.embedding, tokens)[None], torch.arange(n)[None],
                      relaxed_causal_mask(n, 0, 2, end_aligned_offset(n, 2)), block_offset=end_aligned_offset(n, 2))[0]
        torch.testing.assert_close(fresh[n - 6:n - 4], drafter.block)
        torch.testing.assert_close(fresh[n - 4:n - 2], o1[rows1])
        torch.testing.assert_close(fresh[n - 2:], o2[rows2])


@pytest.mark.parametrize("chain_attention", [False, True])
def test_newest_slots_draft_every_slot_from_the_newest_position(llama, chain_attention):
    """newest_slots: update and expansion passes are causal, and each block's slots all come from its newest
    position's output (slot 1 through the chain on slot 0's token; with chain_attention reading what that position
    sees), equal to one fresh causal forward over the committed pairs, the ancestor blocks and the own block, and
    to the teacher-forced slots of that forward."""
    drafter = drafter_for(llama, 2, depth=6, branches=3, newest_slots=True, chain_attention=chain_attention)
    model, calls, forward = drafter.model, [], drafter._forward
    drafter._forward = lambda *args, **kw: calls.append(args[:2] + (forward(*args, **kw),)) or calls[-1][2]
    ids = torch.tensor(prompts(4, llama.vocab_size, seed=2)[3][:11])
    hidden = llama.prefill(ids[:-1])
    drafter.begin(ids, hidden)
    (_, _, committed), = calls
    torch.testing.assert_close(drafter.block, committed[-1:].expand(2, -1))
    calls.clear()
    drafter.propose(ids, max_depth=6)
    (f1, t1, o1), (f2, t2, o2) = calls  # two expansion passes, three branches of two positions each

    def later_slot(features, tokens, token):  # slot 1 of the last position on `token`, teacher-forced
        features, tokens = torch.cat([features, features[-1:]]), torch.cat([tokens, token.view(1)])
        n, embeds = len(tokens), model.embed(drafter.embedding, tokens)[None]
        return model(features[None], embeds, torch.arange(n)[None], relaxed_causal_mask(n, 0, 1),
                     chain_embeds=embeds)[0, n - 2, 1]

    for b in range(3):
        rows2 = slice(2 * b, 2 * b + 2)
        parent = next(i for i in range(3) if torch.equal(f2[2 * b], o1[2 * i + 1]))  # its parent block's newest
        rows1 = slice(2 * parent, 2 * parent + 2)
        torch.testing.assert_close(f2[2 * b + 1], later_slot(torch.cat([hidden, f1[rows1]]),
                                                             torch.cat([ids[1:], t1[rows1]]), t2[2 * b]))
        torch.testing.assert_close(f1[rows1][0], committed[-1])
        torch.testing.assert_close(f1[rows1][1], later_slot(hidden, ids[1:], t1[2 * parent]))
        features = torch.cat([hidden, f1[rows1], f2[rows2]])
        tokens = torch.cat([ids[1:], t1[rows1], t2[rows2]])
        n = len(tokens)
        fresh = model(features[None], model.embed(drafter.embedding, tokens)[None], torch.arange(n)[None],
                      relaxed_causal_mask(n, 0, 1))[0]
        torch.testing.assert_close(fresh[:n - 4], committed)
        torch.testing.assert_close(fresh[n - 4:n - 2], o1[rows1])
        torch.testing.assert_close(fresh[n - 2:], o2[rows2])


def test_chained_slots_draft_per_candidate_and_feed_the_chained_features(llama):
    """With chain_slots, each slot-0 candidate gets its own slot-1 children (slot 1's output conditioned on that
    candidate's token), and an expanded branch reads the conditioned slot-1 output as its feature."""
    drafter = drafter_for(llama, 2, seed=4, chain_slots=True, num_nodes=40, depth=4, top_k=3, branches=2)
    model, calls, forward = drafter.model, [], drafter._forward
    drafter._forward = lambda *args, **kw: calls.append(args) or forward(*args, **kw)
    ids = torch.tensor(prompts(4, llama.vocab_size, seed=2)[3][:11])
    drafter.begin(ids, llama.prefill(ids[:-1]))
    calls.clear()
    tree = drafter.propose(ids, max_depth=4)
    block, children = drafter.block, {}
    for node, parent in enumerate(tree.parents):
        children.setdefault(parent, []).append(tree.tokens[node])

    def best(row, m=3):
        return (row @ drafter.head.T).topk(m).indices.tolist()

    firsts = [n for n, p in enumerate(tree.parents) if p == 0]
    assert sorted(tree.tokens[n] for n in firsts) == sorted(best(block[0]))
    slot1 = {}
    for n in firsts:
        slot1[tree.tokens[n]] = model.chain(block[1], model.embed(drafter.embedding, torch.tensor(tree.tokens[n])))
        assert sorted(children[n]) == sorted(best(slot1[tree.tokens[n]])), "children of the conditioned slot 1"
    assert len({tuple(sorted(children[n])) for n in firsts}) > 1, "different candidates, different children"
    (features, tokens, *_), = calls  # one expansion pass (depth 4 = two blocks)
    for b in range(len(tokens) // 2):
        torch.testing.assert_close(features[2 * b], block[0])
        torch.testing.assert_close(features[2 * b + 1], slot1[int(tokens[2 * b])])


# ----------------------------------------------------------------------------- a drafter that knows the truth
def bigram_target():
    """A target whose layers add nothing: its next token depends on the current token only."""
    target = tiny_target("llama", seed=6)
    with torch.no_grad():
        for layer in target.model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    return target


class TruthModel(SARDrafterModel):
    """Outputs the exact target feature h_{j+k} of a bigram target, using only what the mask lets row j see."""

    def __init__(self, config, target):
        super().__init__(config)
        embedding = target.model.get_input_embeddings().weight.detach()
        self.table = embedding
        self.truth = target.model.model.norm(embedding)  # [V, H]: the target's feature of each token
        self.next_token = target.lm_head(self.truth).argmax(-1)  # [V]

    def forward(self, features, token_embeds, position_ids, attention_mask, past_key_values=None, **blocks):
        super().forward(features, token_embeds, position_ids, attention_mask, past_key_values)  # keeps the KV
        ids = (token_embeds[0, :, None, :] == self.table[None]).all(-1).float().argmax(-1)  # [S] x_{j+1}
        size = ids.shape[0]
        visible = attention_mask[0, 0, :, -size:] == 0  # [S, S] within this chunk
        furthest = (visible * torch.arange(size)).argmax(-1)  # the newest input each row may read
        positions = position_ids[0]
        out = []
        for row in range(size):
            token = ids[furthest[row]]  # x_{q+1}, q = furthest position; the row must output h_{j+k}
            for _ in range(int(positions[row] + self.config.k - positions[furthest[row]] - 1)):
                token = self.next_token[token]
            out.append(self.truth[token])
        return torch.stack(out)[None]


@pytest.mark.parametrize("k", [2, 1])
@pytest.mark.parametrize("static", [False, True])
def test_exact_features_are_accepted(k, static):
    target = bigram_target()
    model = SARDrafterModel.for_target(target, k=k)
    truth = TruthModel(model.config, target)
    truth.load_state_dict(model.state_dict())
    chain = [[0] * d for d in range(1, 7)]
    budget = {"static_tree": chain} if static else {"num_nodes": 16, "depth": 6}
    drafter = SARDrafter(truth, target, **budget)
    plain, spec = SpeculativeGenerator(target), SpeculativeGenerator(target, drafter)
    for prompt in prompts(6, target.vocab_size, seed=11)[3:]:
        expected = plain.generate(input_ids=prompt, max_new_tokens=NEW, ignore_eos=True)
        got = spec.generate(input_ids=prompt, max_new_tokens=NEW, ignore_eos=True)
        assert got.token_ids == expected.token_ids
        if static:  # the depth-6 chain is the truth: every cycle commits 7 tokens (the last one what is left)
            assert got.stats.cycles == math.ceil(NEW / 7)
        else:
            assert got.stats.accepted_tokens >= got.stats.cycles - 1, "the top depth-1 draft is always right"


def test_hand_built_k1_head_is_exact():
    """The real module, hand-set: the fusion passes the embedding on, the layers add nothing: o_j = norm(e(x_{j+1}))."""
    target = bigram_target()
    model = SARDrafterModel.for_target(target, k=1)
    hidden = target.hidden_size
    with torch.no_grad():
        model.fuse.weight.copy_(torch.cat([torch.eye(hidden), torch.zeros(hidden, hidden)], dim=1))
        model.fuse.bias.zero_()
        for layer in model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    drafter = SARDrafter(model, target, static_tree=[[0] * d for d in range(1, 6)])
    prompt = prompts(5, target.vocab_size, seed=13)[4]
    got = SpeculativeGenerator(target, drafter).generate(input_ids=prompt, max_new_tokens=NEW, ignore_eos=True)
    assert got.stats.mean_accepted_length >= 5


# ----------------------------------------------------------------------------- trees
def test_static_tree_validation():
    for paths in STATIC_TREES.values():
        check_rank_paths(paths)
    with pytest.raises(TreeError, match="duplicate"):
        check_rank_paths([[0], [0]])
    with pytest.raises(TreeError, match="no parent"):
        check_rank_paths([[0], [1, 0]])
    with pytest.raises(TreeError, match="ranks"):
        check_rank_paths([[0], [0, -1]])
    with pytest.raises(TreeError, match="deeper"):
        check_rank_paths([[0], [0, 0], [0, 0, 0]], max_depth=2)
    with pytest.raises(ValueError, match="unknown static tree"):
        drafter_for(tiny_target("llama"), 2, static_tree="k7-999")


def test_builder_static_tree_hand_checked():
    # k=2, root 9; slot 0 ranks -> tokens 10, 11; slot 1 ranks -> tokens 20, 21
    builder = DraftTreeBuilder(9, 2, check_rank_paths([[0], [1], [0, 0], [0, 1], [1, 0], [0, 0, 0]]))
    assert builder.ranks_needed == 2
    frontier = builder.grow(0, [[10, 11], [20, 21]], [[-0.1, -2.0], [-0.2, -1.0]])
    assert [builder.nodes[i].ranks for i in frontier] == [(0, 0), (0, 1), (1, 0)]
    branches = builder.next_branches(frontier, limit=8)
    assert [builder.nodes[b].ranks for b in branches] == [(0, 0)] and builder.block_tokens(branches[0]) == [10, 20]
    builder.grow(branches[0], [[30], [40]], [[-0.5], [-0.5]])
    tree = builder.build(num_nodes=100, max_depth=8)
    # depth 1: 10, 11; depth 2: 20, 21 under 10 and 20 under 11; depth 3: 30 under 10->20
    assert tree.tokens == (9, 10, 11, 20, 21, 20, 30)
    assert tree.parents == (-1, 0, 0, 1, 1, 2, 3)


def test_builder_dynamic_keeps_the_best_prefix_closed_nodes():
    builder = DraftTreeBuilder(9, 2, max_per_level=4)
    frontier = builder.grow(0, [[10, 11, 12], [20, 21, 22]], [[-0.1, -1.0, -3.0], [-0.2, -0.5, -4.0]])
    assert len(frontier) == 4  # 9 slot-1 nodes pruned to the best 4
    best = builder.next_branches(frontier, limit=1)[0]
    assert builder.block_tokens(best) == [10, 20]
    tree = builder.build(num_nodes=4, max_depth=2)
    # scores: 10 -0.1, 10->20 -0.3, 10->21 -0.6, 11 -1.0: the three best drafts
    assert tree.tokens == (9, 10, 20, 21) and tree.parents == (-1, 0, 1, 1)


def grown_paths(builder: DraftTreeBuilder, nodes) -> list[tuple[tuple[int, ...], float]]:
    """(token path from the root, score) of ``nodes``, sorted: a tree's content, whatever its node order."""
    def path(i):
        tokens = []
        while i > 0:
            tokens.append(builder.nodes[i].token)
            i = builder.nodes[i].parent
        return tuple(tokens[::-1])

    return sorted((path(i), round(builder.nodes[i].score, 6)) for i in nodes)


def test_builder_grows_several_branches_with_one_call_per_slot():
    """Growing the blocks of several branches together asks for each slot's distributions once (one head product
    per slot for a drafter) and grows exactly what growing them one by one grows, the per-level cap per branch."""
    def grown(together: bool):
        builder, calls = DraftTreeBuilder(9, 2, max_per_level=3), []

        def top_of(slot, parents):  # each parent's children depend on its token
            calls.append(slot)
            tokens = [[100 * slot + builder.nodes[p].token % 7 + r for r in range(3)] for p in parents]
            return tokens, [[-0.1 * (r + 1) - 0.01 * (builder.nodes[p].token % 5) for r in range(3)]
                            for p in parents]

        branches = builder.next_branches(builder.grow_with([0], top_of), limit=2)
        calls.clear()
        if together:
            frontier = builder.grow_with(branches, top_of)
        else:
            frontier = [n for b in branches for n in builder.grow_with([b], top_of)]
        return grown_paths(builder, range(1, len(builder.nodes))), grown_paths(builder, frontier), calls

    (nodes, frontier, calls), (nodes_alone, frontier_alone, calls_alone) = grown(True), grown(False)
    assert nodes == nodes_alone and frontier == frontier_alone
    assert len(frontier) == 6, "3 kept per branch: 9 slot-1 candidates under each of 2 branches"
    assert calls == [0, 1] and calls_alone == [0, 1, 0, 1]


@pytest.mark.parametrize("chain_slots", [False, True])
def test_a_pass_is_scored_in_one_head_product_per_slot(llama, chain_slots):
    """Drafting 4 levels with 2 branches: the first block and the expansion pass each score their candidates in k
    head products (chained slots) or one (independent slots), however many branches the pass expands."""
    drafter = drafter_for(llama, 2, seed=4, chain_slots=chain_slots, num_nodes=40, depth=4, top_k=3, branches=2)
    ids = torch.tensor(prompts(4, llama.vocab_size, seed=2)[3][:11])
    drafter.begin(ids, llama.prefill(ids[:-1]))
    products, top_rows = [], drafter._top_rows
    drafter._top_rows = lambda rows, m: products.append(rows.shape[0]) or top_rows(rows, m)
    tree = drafter.propose(ids, max_depth=4)
    assert tree.max_depth == 4
    if chain_slots:
        assert len(products) == 4 and products[2] == 2, products  # slot 0 of both branches in one product
        products.clear()
        cut = drafter.propose(ids, max_depth=3)  # the last block's second slot is never scored
        assert len(products) == 3 and products[2] == 2, products
        def drafts(t):  # token paths of every node (the budget of 40 holds every candidate here)
            return {tuple(t.tokens[i] for i in t.path_to(n)) for n in range(t.num_nodes)}

        assert cut.max_depth == 3 and drafts(cut) == drafts(tree.truncate(3))
    else:
        assert products == [2, 4], products  # the block's 2 slots; 2 branches x 2 slots
