import pytest
import torch

from falconspec.sampling import SamplingParams
from falconspec.tree import Tree
from falconspec.verify import Acceptance, greedy_verify, sample_verify

VOCAB = 8


def forced_logits(argmax_per_node):
    """+100 on the chosen token of each row, -100 elsewhere (vLLM's forced-argmax tables)."""
    logits = torch.full((len(argmax_per_node), VOCAB), -100.0)
    logits[torch.arange(len(argmax_per_node)), torch.tensor(argmax_per_node)] = 100.0
    return logits


# root 0; children 1 (node 1) and 2 (node 2); node 1 -> 3 (node 3) -> 4 (node 4); node 2 -> 5 (node 5)
TREE = Tree((0, 1, 2, 3, 4, 5), (-1, 0, 0, 1, 3, 2))


@pytest.mark.parametrize(
    "argmax, path, tokens",
    [
        ([6, 0, 0, 0, 0, 0], [0], [6]),  # first draft rejected: bonus only
        ([1, 7, 0, 0, 0, 0], [0, 1], [1, 7]),  # one accepted, then bonus
        ([1, 3, 0, 4, 6, 0], [0, 1, 3, 4], [1, 3, 4, 6]),  # whole branch accepted, bonus after the leaf
        ([2, 0, 5, 0, 0, 7], [0, 2, 5], [2, 5, 7]),  # the second branch (not a prefix of node order)
    ],
)
def test_greedy_verify_tables(argmax, path, tokens):
    acceptance = greedy_verify(TREE, forced_logits(argmax))
    assert acceptance.path == path
    assert acceptance.tokens == tokens
    assert acceptance.num_accepted == len(path) - 1 and acceptance.bonus_token == tokens[-1]


def uniforms_for(tree, generator):
    """Fresh uniforms for every depth of ``tree`` (the engine derives them from the seed and the position)."""
    return torch.rand(max(tree.depth) + 1, generator=generator, dtype=torch.float64)


def first_token_histogram(tree, probs, n, seed, verify=sample_verify):
    generator = torch.Generator().manual_seed(seed)
    counts = torch.zeros(VOCAB)
    for _ in range(n):
        counts[verify(tree, probs, uniforms_for(tree, generator)).tokens[0]] += 1
    return counts


def chi_square(counts, probs):
    expected = probs * counts.sum()
    keep = expected > 0
    assert counts[~keep].sum() == 0, "sampled a token the target gives zero probability"
    df = int(keep.sum()) - 1
    return float(((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()), df


def always_accept(tree, probs, uniforms):
    """A deliberately lossy verifier (accepts the first draft whatever the target says): the negative control."""
    child = next(iter(tree.children[0].values()), None)
    if child is None:
        return sample_verify(tree, probs, uniforms)
    return Acceptance([0, child], [tree.tokens[child], 0])


def test_sample_verify_matches_target_distribution():
    torch.manual_seed(0)
    probs = torch.softmax(torch.randn(TREE.num_nodes, VOCAB) * 1.5, -1)
    probs[0, 7] = 0.0  # a token the target never emits
    probs[0] /= probs[0].sum()
    n = 20_000
    counts = first_token_histogram(TREE, probs, n, seed=1)
    stat, df = chi_square(counts, probs[0])
    assert stat < df + 6 * (2 * df) ** 0.5, (stat, df)
    # the same test catches a lossy verifier
    bad_stat, _ = chi_square(first_token_histogram(TREE, probs, 2_000, seed=1, verify=always_accept), probs[0])
    assert bad_stat > 10 * (df + 6 * (2 * df) ** 0.5)


def test_sample_verify_second_token_follows_accepted_node():
    # when node 1 (token 1) is accepted, the next token must follow probs[1] (a child draft or the bonus)
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(TREE.num_nodes, VOCAB), -1)
    probs[0] = torch.tensor([0.0, 1.0, 0, 0, 0, 0, 0, 0])  # forces acceptance of token 1
    generator = torch.Generator().manual_seed(2)
    counts = torch.zeros(VOCAB)
    for _ in range(10_000):
        acceptance = sample_verify(TREE, probs, uniforms_for(TREE, generator))
        assert acceptance.tokens[0] == 1
        counts[acceptance.tokens[1]] += 1
    stat, df = chi_square(counts, probs[1])
    assert stat < df + 6 * (2 * df) ** 0.5, (stat, df)


def test_sample_verify_is_seeded_and_leaves_inputs_alone():
    probs = torch.softmax(torch.randn(TREE.num_nodes, VOCAB), -1)
    before = probs.clone()
    uniforms = torch.tensor([0.3, 0.6, 0.1, 0.9])
    runs = [sample_verify(TREE, probs, uniforms).tokens for _ in range(20)]
    assert all(r == runs[0] for r in runs)
    assert torch.equal(probs, before)


def test_sample_verify_commits_the_targets_own_samples_whatever_the_tree():
    """The committed tokens are the inverse-CDF samples of the accepted path's rows, so the tree and no tree at all
    commit the same first token."""
    probs = torch.softmax(torch.randn(TREE.num_nodes, VOCAB, generator=torch.Generator().manual_seed(3)), -1)
    for seed in range(50):
        uniforms = uniforms_for(TREE, torch.Generator().manual_seed(seed))
        acceptance = sample_verify(TREE, probs, uniforms)
        path, tokens = acceptance.path, acceptance.tokens
        for node, token in zip(path, tokens):  # every committed token is the sample of its parent's row
            cdf = probs[node].double().cumsum(0)
            assert token == int(torch.searchsorted(cdf, uniforms[TREE.depth[node]].item() * cdf[-1], right=True))
        alone = sample_verify(Tree.root_only(0), probs[:1], uniforms)
        assert alone.tokens == tokens[:1]


def test_sampling_params_warp_and_validate():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0]])
    probs = SamplingParams(temperature=1.0, top_k=2).target_probs(logits)
    assert probs[0, 2:].sum() == 0 and torch.isclose(probs.sum(), torch.tensor(1.0))
    probs = SamplingParams(temperature=1.0, top_p=0.5).target_probs(logits)
    assert probs[0, 0] == 1.0, "the top token alone holds more than top_p"
    probs = SamplingParams(temperature=0.5).target_probs(logits)
    assert torch.allclose(probs, torch.softmax(logits / 0.5, -1))
    for bad in [dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0), dict(top_p=1.5),
                dict(top_k=-1), dict(top_k=1.5), dict(seed="x"), dict(temperature="hot")]:
        with pytest.raises(ValueError):
            SamplingParams(**bad)
    with pytest.raises(ValueError, match="argmax"):
        SamplingParams().target_probs(logits)
