import json
import random

import pytest
import torch
import torch.nn.functional as F

from falconspec import SpeculativeGenerator
from falconspec.drafters import make_drafter
from falconspec.drafters.medusa import MedusaConfig, MedusaDrafter, MedusaHeads
from falconspec.drafters.sar_model import DrafterMismatchError
from falconspec.testing import tiny_target
from falconspec.train import TrainConfig, train
from falconspec.train_common import distillation_losses
from falconspec.train_medusa import head_targets, medusa_losses


def random_heads(target, num_heads=3, seed=0, draft_vocab=None):
    torch.manual_seed(seed)
    model = MedusaHeads.for_target(target, num_heads, draft_vocab)
    for head in model.heads:  # away from the identity init, so the heads disagree with each other
        torch.nn.init.normal_(head.weight, std=0.3)
    return model


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_greedy_output_equals_plain_greedy(arch):
    target = tiny_target(arch, seed=6)
    rng = random.Random(0)
    for i, vocab in enumerate([None, list(range(2, 60))]):
        drafter = MedusaDrafter(random_heads(target, seed=i, draft_vocab=vocab), target, num_nodes=6, top_k=3)
        for _ in range(3):
            prompt = [rng.randrange(4, target.vocab_size) for _ in range(rng.randint(1, 12))]
            expected = SpeculativeGenerator(target).generate(input_ids=prompt, max_new_tokens=30, ignore_eos=True)
            got = SpeculativeGenerator(target, drafter).generate(input_ids=prompt, max_new_tokens=30, ignore_eos=True)
            assert got.token_ids == expected.token_ids
            assert got.stats.drafted_tokens > 0


def test_tree_is_the_best_product_of_head_guesses(llama):
    drafter = MedusaDrafter(random_heads(llama, num_heads=3), llama, num_nodes=5, top_k=2)
    drafter.begin(torch.tensor([5, 6, 7]), torch.randn(2, llama.hidden_size))
    tree = drafter.propose(torch.tensor([5, 6, 7]), max_depth=8)
    assert tree.tokens[0] == 7 and tree.num_nodes == 5 and tree.max_depth <= 3
    assert drafter.propose(torch.tensor([5, 6, 7]), max_depth=1).max_depth == 1
    drafter.begin(torch.tensor([5]), torch.empty(0, llama.hidden_size))  # one-token prompt: no feature yet
    assert drafter.propose(torch.tensor([5]), max_depth=4).num_nodes == 1


def test_save_load_round_trip_and_mismatch(tmp_path, llama):
    model = random_heads(llama, draft_vocab=list(range(10, 40)))
    model.save_pretrained(tmp_path / "m")
    loaded = MedusaHeads.from_pretrained(tmp_path / "m", llama)
    x = torch.randn(2, llama.hidden_size)
    torch.testing.assert_close(loaded(x), model(x))
    assert isinstance(make_drafter(str(tmp_path / "m"), llama), MedusaDrafter)
    with pytest.raises(DrafterMismatchError, match="hidden size"):
        MedusaHeads.from_pretrained(tmp_path / "m", tiny_target("llama", hidden_size=32))
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "format": "other"}))
    with pytest.raises(ValueError, match="not a falconspec SAR drafter config"):
        make_drafter(str(tmp_path / "m"), llama)


def test_head_targets_align_heads_with_tokens_ahead():
    ids = torch.arange(10, 16)  # x_0..x_5; the target's greedy token at t is 100 + x_t
    s = {"input_ids": ids, "loss_mask": torch.tensor([0, 0, 1, 1, 1, 1]), "target_tokens": ids + 100,
         "hidden_states": ids[:, None].float().expand(-1, 4)}
    batch = head_targets([s], num_heads=2, max_len=64)
    # head i at position j guesses x_{j+2+i}: label = greedy token at j+1+i, trained while x_{j+2+i} is assistant
    assert batch["labels"][0, :, 0].tolist() == [111, 112, 113, 114, -1, -1]
    assert batch["labels"][0, :, 1].tolist() == [112, 113, 114, -1, -1, -1]
    assert batch["valid"][0, :, 0].tolist() == [True, True, True, True, False, False]
    assert batch["valid"][0, :, 1].tolist() == [True, True, True, False, False, False]
    assert batch["source"][0, 0].tolist() == [1, 2]


def test_training_lowers_the_loss_and_writes_a_loadable_drafter(tiny_data):
    out = tiny_data / "medusa"
    cfg = TrainConfig(data=str(tiny_data / "train"), out=str(out), eval_data=str(tiny_data / "held"),
                      model=str(tiny_data / "tiny"), kind="medusa", medusa_heads=3, max_steps=40, eval_every=20,
                      save_every=20, log_every=1, draft_vocab=48, lr=3e-2, warmup=2, batch_size=4, eval_samples=2)
    final = train(cfg)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["total"] for r in records if "total" in r]
    assert losses[-1] < 0.7 * losses[0]
    recipe = json.loads((final / "recipe.json").read_text())
    assert "acc@1" in recipe["final"] and recipe["config"]["kind"] == "medusa"
    target = tiny_target("llama")
    drafter = make_drafter(str(final), target)
    assert isinstance(drafter, MedusaDrafter) and drafter.model.config.num_heads == 3
    cfg.max_steps = 45  # resumes from the step-40 checkpoint
    train(cfg)
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines() if '"total"' in line]
    assert steps[-5:] == [41, 42, 43, 44, 45]


def test_losses_project_each_target_position_once_with_the_per_head_values():
    torch.manual_seed(0)
    hidden, vocab, heads = 8, 11, 3
    samples = [{"input_ids": torch.arange(n), "loss_mask": (torch.arange(n) > 1).long(),
                "target_tokens": torch.randint(0, vocab, (n,)), "hidden_states": torch.randn(n, hidden)}
               for n in (9, 6)]
    batch = head_targets(samples, num_heads=heads, max_len=64)
    model = MedusaHeads(MedusaConfig(hidden_size=hidden, vocab_size=vocab, num_heads=heads))
    head, vocab_index = torch.randn(vocab, hidden), torch.arange(vocab)
    got = medusa_losses(model, batch, head, vocab_index, kl_weight=0.7)
    # the reference: every (position, head) pair projects its own target feature
    valid = batch["valid"]
    b_idx = torch.arange(valid.shape[0])[:, None, None].expand_as(valid)
    true = batch["features"][b_idx, batch["source"]][valid]
    kl, ce, _ = distillation_losses(F.linear(model(batch["features"])[valid], head), F.linear(true, head),
                                    batch["labels"][valid])
    torch.testing.assert_close(got["total"], 0.7 * kl + 0.3 * ce)

