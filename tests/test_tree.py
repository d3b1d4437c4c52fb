import pytest
import torch

from falconspec.tree import Tree, TreeError, validate_paths


def example():
    # root 7 with drafts 7 -> 3 -> 9 and 7 -> 4 (the module docstring's example)
    return Tree((7, 3, 4, 9), (-1, 0, 0, 1))


def test_worked_example_mask_positions_and_paths():
    tree = example()
    assert tree.depth == (0, 1, 1, 2)
    assert tree.position_ids(prefix_len=5).tolist() == [5, 6, 6, 7]
    assert tree.ancestor_mask().int().tolist() == [[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]
    mask = tree.attention_mask(prefix_len=2)
    assert mask.shape == (1, 1, 4, 6)
    assert (mask[0, 0, :, :2] == 0).all(), "every node sees the whole prefix"
    blocked = torch.finfo(torch.float32).min
    assert mask[0, 0, 3].tolist() == [0, 0, 0, 0, blocked, 0], "node 3 sees root, node 1 and itself, not node 2"
    assert tree.leaf_paths() == [[0, 2], [0, 1, 3]]
    assert tree.children[0] == {3: 1, 4: 2}
    assert not tree.is_chain and Tree.chain(1, [2, 3]).is_chain


def test_from_paths_and_merge_agree():
    a = Tree.from_paths(7, [[3], [4], [3, 9]])
    b = Tree.merge(7, [[3, 9], [4]])
    assert sorted(zip(a.depth, a.tokens)) == sorted(zip(b.depth, b.tokens))
    assert Tree.merge(7, [[1, 2, 3], [1, 2, 4], [5]], max_nodes=4).num_nodes == 4


def test_truncate_remaps_parents():
    tree = Tree.merge(0, [[1, 2, 3], [4, 5]])
    cut = tree.truncate(1)
    assert cut.tokens == (0, 1, 4) and cut.parents == (-1, 0, 0)
    assert tree.truncate(5) is tree
    assert tree.truncate(0).tokens == (0,)


@pytest.mark.parametrize(
    "tokens, parents, message",
    [
        ((), (), "at least the root"),
        ((1, 2), (-1,), "differ in length"),
        ((1, 2), (0, 0), "must have parent -1"),
        ((1, 2, 3), (-1, 2, 0), "earlier node"),
        ((1, 2, 2), (-1, 0, 0), "duplicate path"),
    ],
)
def test_invalid_trees_raise_clear_errors(tokens, parents, message):
    with pytest.raises(TreeError, match=message):
        Tree(tokens, parents)


def test_validate_paths():
    validate_paths([[0], [1], [0, 0], [0, 1]], max_depth=2)
    with pytest.raises(TreeError, match="duplicate path"):
        validate_paths([[0], [0]])
    with pytest.raises(TreeError, match="no parent"):
        validate_paths([[0], [1, 0]])
    with pytest.raises(TreeError, match="deeper than the limit"):
        validate_paths([[0], [0, 0]], max_depth=1)
    with pytest.raises(TreeError, match="empty"):
        validate_paths([[]])
    with pytest.raises(TreeError):
        Tree.from_paths(1, [[2, 3]])
    with pytest.raises(TreeError, match="max_depth"):
        example().truncate(-1)
