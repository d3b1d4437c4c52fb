import pytest
import torch

from falconspec import SpeculativeGenerator
from falconspec.drafters import LookaheadDrafter, make_drafter
from falconspec.drafters.lookahead import settings_for_budget, tree_nodes
from falconspec.testing import tiny_target


def started(window=3, ngram=3, guesses=2, pool_size=8):
    drafter = LookaheadDrafter(window=window, ngram=ngram, guesses=guesses, pool_size=pool_size)
    drafter.begin(torch.tensor([1, 2, 3]), torch.zeros(2, 4))
    return drafter


def one_hot_logits(tree, predictions, vocab=100):
    """Logits whose argmax at node i is predictions.get(i, 0)."""
    logits = torch.zeros(tree.num_nodes, vocab)
    for node in range(tree.num_nodes):
        logits[node, predictions.get(node, 0)] = 1.0
    return logits


def test_the_window_is_the_papers_2d_mask_as_a_tree():
    drafter = started()
    drafter.levels = [[10, 11, 12], [20, 21, 22]]  # a0 a1 a2 / b0 b1 b2
    tree = drafter.propose(torch.tensor([1, 2, 3]), max_depth=10)
    assert tree.num_nodes == 1 + drafter.window_nodes == 7
    node = {tok: i for i, tok in enumerate(tree.tokens)}
    assert [tree.parents[node[t]] for t in (10, 11, 12)] == [0, node[10], node[11]], "level 0 is a chain"
    assert [tree.parents[node[t]] for t in (20, 21, 22)] == [node[10], node[11], node[12]], "b_j hangs below a_j"
    assert [tree.depth[node[t]] for t in (20, 21, 22)] == [2, 3, 4]


def test_a_jacobi_step_fills_the_pool_and_moves_the_levels():
    drafter = started()
    drafter.levels = [[10, 11, 12], [20, 21, 22]]
    drafter.steps = 1  # past the fill-up step: the columns are N-grams
    tree = drafter.propose(torch.tensor([1, 2, 3]), max_depth=10)
    node = {tok: i for i, tok in enumerate(tree.tokens)}
    drafter.observe_forward(tree, one_hot_logits(tree, {node[20]: 30, node[21]: 31, node[22]: 32}))
    assert drafter.levels == [[20, 21, 22], [30, 31, 32]]
    assert drafter.pool == {10: [(20, 30)], 11: [(21, 31)], 12: [(22, 32)]}
    # pool N-grams that start with the root become drafts beside the window
    tree = drafter.propose(torch.tensor([5, 11]), max_depth=10)
    guess = tree.children[0][21]
    assert 31 in tree.children[guess] and tree.num_nodes == 1 + 2 + drafter.window_nodes


def test_fill_up_steps_do_not_pollute_the_pool():
    drafter = started(ngram=4)  # levels 1 and 2 hold predictions only after two steps
    for step in range(3):
        tree = drafter.propose(torch.tensor([1, 2, 3]), max_depth=20)
        drafter.observe_forward(tree, one_hot_logits(tree, {}))
        assert bool(drafter.pool) == (step == 2)


def test_the_pool_keeps_the_newest_continuations():
    drafter = started(pool_size=2, guesses=2)
    for gram in [(7, 1, 1), (7, 2, 2), (7, 1, 1), (7, 3, 3)]:
        drafter._remember(gram)
    assert drafter.pool[7] == [(3, 3), (1, 1)]


def test_a_cut_tree_keeps_the_guesses_it_could_not_update():
    drafter = started()
    drafter.levels = [[10, 11, 12], [20, 21, 22]]
    tree = drafter.propose(torch.tensor([1, 2, 3]), max_depth=10).truncate(2)  # only a0, a1 and b0 survive
    node = {tok: i for i, tok in enumerate(tree.tokens)}
    drafter.observe_forward(tree, one_hot_logits(tree, {node[20]: 30}))
    assert drafter.levels == [[20, 21, 22], [30, 21, 22]]


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("settings", [dict(window=3, ngram=3, guesses=2), dict(window=1, ngram=2, guesses=0),
                                      dict(window=4, ngram=4, guesses=3, pool_size=2)])
def test_lookahead_output_equals_plain_greedy(arch, settings):
    target = tiny_target(arch, seed=5)
    plain = SpeculativeGenerator(target)
    accepted = 0
    for i, prompt in enumerate([[5, 6, 7], [9, 10, 11, 9, 10, 11, 12], list(range(20, 60))]):
        expected = plain.generate(input_ids=prompt, max_new_tokens=48, ignore_eos=True)
        got = SpeculativeGenerator(target, LookaheadDrafter(**settings, seed=i)).generate(
            input_ids=prompt, max_new_tokens=48, ignore_eos=True)
        assert got.token_ids == expected.token_ids, f"prompt {i}"
        assert got.stats.new_tokens == 48
        accepted += got.stats.accepted_tokens
    # a tiny random model's greedy output falls into loops: the Jacobi window must find them
    assert accepted > 0


def test_lookahead_by_name_and_bad_settings(llama):
    drafter = make_drafter("lookahead", llama)  # planned; until the first plan it holds the 4-node shape
    assert isinstance(drafter, LookaheadDrafter) and drafter.num_parameters() == 0
    assert (drafter.window, drafter.ngram, drafter.guesses) == settings_for_budget(4) == (1, 2, 2)
    assert make_drafter("lookahead", llama, window=2).window == 2
    for bad in (dict(window=0), dict(ngram=1), dict(guesses=-1), dict(pool_size=0), dict(num_nodes=2)):
        with pytest.raises(ValueError, match="lookahead needs"):
            LookaheadDrafter(**bad)


@pytest.mark.parametrize("num_nodes", [3, 4, 8, 20, 32, 100])
def test_settings_fit_the_tree_budget(num_nodes):
    settings = settings_for_budget(num_nodes)
    assert tree_nodes(*settings) <= num_nodes
    drafter = LookaheadDrafter(num_nodes=num_nodes)
    drafter.begin(torch.arange(1, 40), torch.zeros(38, 4))
    for i in range(drafter.guesses + 1):
        drafter._remember((5, 10 + i, 20 + i, 30 + i, 40 + i)[:drafter.ngram])
    assert drafter.propose(torch.tensor([1, 5]), max_depth=50).num_nodes <= num_nodes
