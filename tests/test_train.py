import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from falconspec.drafters.sar_model import DrafterMismatchError, SARDrafterModel, relaxed_causal_mask
from falconspec.testing import tiny_target
from falconspec.train import (
    scored_windows,
    TrainConfig, apply_glances, block_alignments, choose_glances, compute_losses, csgd_step, forward, make_batch,
    rollout, rollout_starts, train, unroll_blocks,
)

def sample(ids, mask, hidden=4):
    ids = torch.tensor(ids)
    return {"input_ids": ids, "loss_mask": torch.tensor(mask), "target_tokens": ids + 100,
            "hidden_states": ids[:, None].float().expand(-1, hidden) * 1.0}


def test_make_batch_pairs_and_shifts():
    # tokens x_0..x_5 = 10..15, assistant tokens x_3..x_5; feature h_t = t + 10 (per row)
    batch = make_batch([sample([10, 11, 12, 13, 14, 15], [0, 0, 0, 1, 1, 1]), sample([20, 21, 22], [0, 1, 1])],
                       k=2, max_len=64)
    assert batch.tokens[0].tolist() == [11, 12, 13, 14, 15]  # x_{j+1}
    assert batch.features[0, :, 0].tolist() == [10, 11, 12, 13, 14]  # h_j
    assert batch.target_features[0, :, 0].tolist() == [12, 13, 14, 0, 0]  # h_{j+2}
    assert batch.labels[0].tolist() == [112, 113, 114, -1, -1]  # greedy token at j+2
    assert batch.valid[0].tolist() == [True, True, True, False, False]  # x_{j+3} is an assistant token
    assert batch.next_tokens[0].tolist() == [13, 14, 15, 0, 0]  # x_{j+3}
    assert batch.key_padding[1].tolist() == [True, True, False, False, False]
    assert not batch.valid[1].any()  # x_{j+3} does not exist


def test_glancing_rule_count_slots_inputs_and_losses():
    gen = torch.Generator().manual_seed(0)
    valid = torch.ones(2, 40, dtype=torch.bool)
    valid[1, 30:] = False
    offsets = torch.tensor([0, 1])
    chosen = choose_glances(valid, torch.tensor([25, 9]), offsets, 0.4, k=2, generator=gen)
    assert chosen.sum(-1).tolist() == [10, 3]  # floor(0.4 * d)
    slots = (torch.arange(40)[None] + offsets[:, None]) % 2
    assert (slots[chosen] == 0).all() and (valid | ~chosen).all()  # first block slots, trained positions only
    assert not choose_glances(valid, torch.tensor([2, 2]), offsets, 0.4, 2, gen).any()  # floor(0.8) = 0

    batch = make_batch([sample(list(range(10, 30)), [0] * 5 + [1] * 15)], k=2, max_len=64)
    mask = torch.zeros_like(batch.valid)
    mask[0, [6, 10]] = True
    features, tokens = apply_glances(batch, mask, batch.features)
    assert tokens[0, 6] == 19 and tokens[0, 10] == 23 and tokens[0, 7] == batch.tokens[0, 7]  # x_{j+3}
    assert features[0, 6, 0] == 18 and features[0, 10, 0] == 22  # h_{j+2}


def target_sample(llama, length: int, prompt: int) -> dict:
    """A random sequence with the tiny target's features and greedy tokens; loss on all but the first ``prompt``."""
    s = {"input_ids": torch.randint(4, 100, (length,)),
         "loss_mask": torch.tensor([0] * prompt + [1] * (length - prompt))}
    with torch.no_grad():
        s["hidden_states"] = llama.decoder(input_ids=s["input_ids"][None]).last_hidden_state[0]
        s["target_tokens"] = llama.lm_head(s["hidden_states"]).argmax(-1)
    return s


def test_csgd_step_excludes_glanced_positions(llama):
    cfg = TrainConfig(data="", out="", k=2, num_layers=1, feature_noise=0.0)
    model = SARDrafterModel.for_target(llama, k=2, num_layers=1)
    s = target_sample(llama, 40, 8)
    batch = make_batch([s, s], k=2, max_len=64)
    head, vocab_index = llama.lm_head.weight.detach(), torch.arange(llama.vocab_size)
    embed = llama.model.get_input_embeddings().weight.detach()
    losses, record = csgd_step(model, embed, head, vocab_index, batch, cfg, 0.5, torch.Generator().manual_seed(1))
    assert 0 < record["glanced"] <= record["hamming"] // 2  # floor(0.5 * d) per sample, at most
    assert losses.count == int(batch.valid.sum()) - record["glanced"]
    plain, record = csgd_step(model, embed, head, vocab_index, batch, TrainConfig(data="", out="", glance=False,
                                                                                 feature_noise=0.0), 0.5, None)
    assert record == {} and plain.count == int(batch.valid.sum())


def test_later_slot_weight_weighs_the_second_token_of_each_block(llama):
    torch.manual_seed(0)
    model = SARDrafterModel.for_target(llama, k=2, num_layers=1)
    s = target_sample(llama, 30, 6)
    batch = make_batch([s, s], k=2, max_len=64)
    head, vocab_index = llama.lm_head.weight.detach(), torch.arange(llama.vocab_size)
    offsets = torch.tensor([0, 1])
    with torch.no_grad():
        out = forward(model, 2, llama.model.get_input_embeddings().weight.detach(), batch, batch.features,
                      batch.tokens, offsets)

    def total(weight, valid=batch.valid):
        cfg = TrainConfig(data="", out="", k=2, later_slot_weight=weight)
        return float(compute_losses(out, batch, valid, head, vocab_index, cfg, offsets).total)

    slot = (torch.arange(batch.valid.shape[1])[None] + offsets[:, None]) % 2
    assert total(1.0) == pytest.approx(float(compute_losses(out, batch, batch.valid, head, vocab_index,
                                                            TrainConfig(data="", out="", k=2)).total))
    # a huge weight leaves (almost) only the second slots' losses; weight 0 only the first slots'
    assert total(1e6) == pytest.approx(total(1.0, batch.valid & (slot == 1)), rel=1e-4)
    assert total(0.0) == pytest.approx(total(1.0, batch.valid & (slot == 0)), rel=1e-5)
    first, second = total(0.0), total(1e6)  # equal weights: the mean of all positions lies between the two
    assert min(first, second) - 1e-6 <= total(1.0) <= max(first, second) + 1e-6


def test_top_k_distillation_spans_greedy_ce_to_the_full_kl():
    from falconspec.train_common import distillation_losses

    torch.manual_seed(0)
    draft, target = torch.randn(6, 10), torch.randn(6, 10) * 3
    greedy = target.argmax(-1)
    full, ce, logp = distillation_losses(draft, target, greedy)
    assert float(distillation_losses(draft, target, greedy, topk=10)[0]) == pytest.approx(float(full))
    assert float(distillation_losses(draft, target, greedy, topk=0)[0]) == pytest.approx(float(full))
    # k = 1: the renormalised target is one-hot on its greedy token, so the KL is the CE to that token
    assert float(distillation_losses(draft, target, greedy, topk=1)[0]) == pytest.approx(float(ce))
    # k = 3 by hand: KL(renormalised top 3 || the drafter's probabilities of those tokens)
    top = target.topk(3, -1)
    p3 = top.values.softmax(-1)
    by_hand = (p3 * (p3.log() - logp.gather(-1, top.indices))).sum(-1).mean()
    kl3 = distillation_losses(draft, target, greedy, topk=3)[0]
    assert float(kl3) == pytest.approx(float(by_hand), rel=1e-5)
    assert float(kl3) != pytest.approx(float(full), rel=1e-3)
    with pytest.raises(ValueError, match="distill-topk"):
        TrainConfig(data="", out="", distill_topk=-1)


def test_scored_windows_are_the_same_for_every_k_and_run():
    """Held-out acc@d scores the valid windows with the highest fixed per-position keys: no run seed enters, and a k=1
    head and a k=2 drafter are scored on the same starts (bar those only one of them can start at)."""
    L = 120
    ids = torch.randint(4, 50, (L,), generator=torch.Generator().manual_seed(0))
    sample = {"input_ids": ids, "target_tokens": torch.cat([ids[1:], ids[:1]]),
              "loss_mask": (torch.arange(L) >= 10).long()}  # an answer from position 10: windows start at 9
    keys = torch.rand(L, generator=torch.Generator().manual_seed(1))
    head, falcon = (scored_windows(sample, k, 8, 0, keys, 16) for k in (1, 2))
    assert torch.equal(head, falcon) and len(head) == 16 and torch.equal(head, head.sort().values)
    valid = torch.arange(9, L - 8)
    assert set(head.tolist()) == set(valid[keys[valid].topk(16).indices].tolist())
    openings = scored_windows(sample, 2, 8, 20, keys, 16)  # only the answer's first 20 tokens start a window
    assert len(openings) == 16 and set(openings.tolist()) <= set(range(9, 29))
    assert len(scored_windows(sample, 2, 8, 0, keys, 1000)) == len(valid)  # fewer than max_starts: every one


@pytest.mark.parametrize("k, newest_pair, chain_slots, newest_slots", [
    (1, False, False, False), (2, False, False, False), (2, True, False, False), (2, False, True, False),
    (3, True, True, False), (2, False, True, True), (3, False, True, True), (2, False, True, "reversed"),
    (3, True, True, "reversed"), (2, False, True, "attend"), (3, False, True, "attend")])
def test_rollout_matches_uncached_reference(llama, k, newest_pair, chain_slots, newest_slots):
    torch.manual_seed(k)
    reversed_slots, attend = newest_slots == "reversed", newest_slots == "attend"
    newest_slots = newest_slots is True or attend
    model = SARDrafterModel.for_target(llama, k=k, num_layers=2, newest_pair=newest_pair, chain_slots=chain_slots,
                                       newest_slots=newest_slots, reversed_slots=reversed_slots,
                                       chain_attention=attend).eval()
    with torch.no_grad():
        if newest_pair:
            model.newest.weight.normal_(0, 0.05)
        if chain_slots:
            model.chain.down.weight.normal_(0, 0.5)
        if attend:
            model.chain_attention.out.weight.normal_(0, 0.5)
    ids = torch.randint(4, 100, (30,))
    with torch.no_grad():
        hidden = llama.decoder(input_ids=ids[None]).last_hidden_state[0]
    s = {"input_ids": ids, "hidden_states": hidden, "target_tokens": llama.lm_head(hidden).argmax(-1),
         "loss_mask": torch.ones(30, dtype=torch.long)}
    head, embed, vocab = llama.lm_head.weight.detach(), llama.model.get_input_embeddings().weight.detach(), \
        torch.arange(llama.vocab_size)
    starts, depth = torch.tensor([5, 8, 9, 14]), 6
    hits = rollout(model, embed, head, vocab, s, starts, depth)
    with torch.no_grad():
        for row, t in enumerate(starts.tolist()):  # one start at a time, whole sequence re-run every pass
            feats, toks, drafted = hidden[:t], ids[1 : t + 1], []
            while len(drafted) < depth:
                n = len(toks)
                if newest_slots:  # causal; every slot from the newest output
                    out = model(feats[None], model.embed(embed, toks[None]), torch.arange(n)[None],
                                relaxed_causal_mask(n, 0, 1))[0, -1:].expand(k, -1)
                else:
                    mask = relaxed_causal_mask(n, 0, k, block_offset=(-n) % k)
                    out = model(feats[None], model.embed(embed, toks[None]), torch.arange(n)[None], mask,
                                block_offset=(-n) % k)[0, -k:]
                    if reversed_slots:  # slot s from the block's position k-1-s
                        out = out.flip(0)
                rows, new = [], []
                for slot in range(k):  # chained slots read the token drafted at the slot before
                    if slot and newest_slots:  # teacher-forced over the inputs with the tokens drafted so far
                        ext = torch.cat([toks, torch.tensor(new)])
                        e = model.embed(embed, ext[None])
                        rows.append(model(torch.cat([feats, feats[-1:].expand(slot, -1)])[None], e,
                                          torch.arange(n + slot)[None], relaxed_causal_mask(n + slot, 0, 1),
                                          chain_embeds=e)[0, n - 1, slot])
                    else:
                        rows.append(out[slot] if slot == 0 or not chain_slots else
                                    model.chain(out[slot], model.embed(embed, torch.tensor(new[-1]))))
                    new.append(int((rows[-1] @ head.T).argmax()))
                drafted += new
                feats, toks = torch.cat([feats, torch.stack(rows)]), torch.cat([toks, torch.tensor(new)])
            truth = s["target_tokens"][t : t + depth]
            assert hits[row].tolist() == (torch.tensor(drafted[:depth]) == truth).tolist()


@pytest.mark.parametrize("k, newest_pair, chain_slots, offset", [
    (2, False, False, 0), (2, False, False, 1), (2, True, False, 1), (1, False, False, 0), (2, True, True, 1),
    (2, False, True, 0), (3, True, True, 2)])
def test_unrolled_blocks_attend_and_read_as_drafting_does(llama, k, newest_pair, chain_slots, offset):
    """Pass s of training-time test at a position of block b = the s-th drafting pass after a prefix that ends with
    block b - s, recomputed from scratch (the drafter's own features and greedy tokens fed back block by block; with
    chained slots, slot i's output conditioned on the token drafted at slot i - 1)."""
    torch.manual_seed(k + offset)
    model = SARDrafterModel.for_target(llama, k=k, num_layers=2, newest_pair=newest_pair,
                                       chain_slots=chain_slots).eval()
    with torch.no_grad():
        if newest_pair:
            model.newest.weight.normal_(0, 0.05)
        if chain_slots:
            model.chain.down.weight.normal_(0, 0.5)
    s = target_sample(llama, 24, 0)
    batch = make_batch([s], k=k, max_len=64)
    head, embed, vocab = llama.lm_head.weight.detach(), llama.model.get_input_embeddings().weight.detach(), \
        torch.arange(llama.vocab_size)
    offsets = torch.tensor([offset])
    S = batch.tokens.shape[1]
    with torch.no_grad():
        cache = model.new_cache()
        out = forward(model, k, embed, batch, batch.features, batch.tokens, offsets, cache, chain=False)
        passes = unroll_blocks(model, embed, head, vocab, batch, out, cache, offsets, torch.ones(1, S, dtype=bool), 2)
        for t in range(k + (-offset) % k, S - 2 * k, k):  # t: a block start after at least one whole block
            feats, toks = s["hidden_states"][:t], s["input_ids"][1 : t + 1]
            for step, (unrolled, ok) in enumerate(passes):
                n = len(toks)
                mask = relaxed_causal_mask(n, 0, k, block_offset=(-n) % k)
                raw = model(feats[None], model.embed(embed, toks[None]), torch.arange(n)[None], mask,
                            block_offset=(-n) % k)[0, -k:]
                rows, drafted = [], []
                for slot in range(k):
                    rows.append(raw[slot] if slot == 0 or not chain_slots else
                                model.chain(raw[slot], model.embed(embed, drafted[-1])))
                    drafted.append((rows[-1] @ head.T).argmax(-1))
                new = torch.stack(rows)
                feats, toks = torch.cat([feats, new]), torch.cat([toks, torch.stack(drafted)])
                if step:  # the block the unrolled pass `step` computed: positions t + (step - 1) k ..
                    rows = torch.arange(t + (step - 1) * k, t + step * k)
                    assert passes[step - 1][1][0, rows].all()
                    torch.testing.assert_close(passes[step - 1][0][0, rows], new, atol=2e-5, rtol=1e-4)
    assert not passes[0][1][0, :k].any() and not passes[1][1][0, : 2 * k].any()  # no chain before the start
    if offset:  # nor from the block the sequence start cuts
        assert not passes[0][1][0, k : 2 * k - offset].any()


def test_every_alignment_trains_each_sequence_once_per_block_alignment(llama):
    torch.manual_seed(0)
    model = SARDrafterModel.for_target(llama, k=2, num_layers=1)
    s = target_sample(llama, 30, 6)
    head, vocab_index = llama.lm_head.weight.detach(), torch.arange(llama.vocab_size)
    embed = llama.model.get_input_embeddings().weight.detach()
    cfg = TrainConfig(data="", out="", k=2, feature_noise=0.0, glance=False, every_alignment=True)
    one = make_batch([s], k=2, max_len=64)
    losses, _ = csgd_step(model, embed, head, vocab_index, one, cfg, 0.0, torch.Generator().manual_seed(1))
    # the same as the sequence written twice, trained once with blocks starting at even and once at odd positions
    two, offsets = make_batch([s, s], k=2, max_len=64), torch.tensor([0, 1])
    reference = compute_losses(forward(model, 2, embed, two, two.features, two.tokens, offsets), two, two.valid, head,
                               vocab_index, cfg, offsets)
    assert losses.count == 2 * int(one.valid.sum()) == reference.count
    assert float(losses.total.detach()) == pytest.approx(float(reference.total.detach()), rel=1e-5)
    # because the step trains exactly that batch: the sequence twice, at alignments 0 and 1
    trained, alignments = block_alignments(one, cfg, torch.Generator().manual_seed(1))
    assert alignments.tolist() == [0, 1] and torch.equal(trained.tokens, two.tokens)
    assert torch.equal(trained.features, two.features) and torch.equal(trained.valid, two.valid)
    with pytest.raises(ValueError, match="--kind sar"):
        TrainConfig(data="", out="", kind="medusa", every_alignment=True)
    with pytest.raises(ValueError, match="with --k 1 there is only one"):
        TrainConfig(data="", out="", k=1, every_alignment=True)


def test_training_time_test_adds_the_unrolled_blocks_losses(llama):
    model = SARDrafterModel.for_target(llama, k=2, num_layers=1)
    s = target_sample(llama, 40, 8)
    batch = make_batch([s, s], k=2, max_len=64)
    head, vocab_index = llama.lm_head.weight.detach(), torch.arange(llama.vocab_size)
    embed = llama.model.get_input_embeddings().weight.detach()

    def step(**settings):
        cfg = TrainConfig(data="", out="", k=2, feature_noise=0.0, glance=False, **settings)
        return csgd_step(model, embed, head, vocab_index, batch, cfg, 0.0, torch.Generator().manual_seed(1),
                         torch.arange(llama.vocab_size))

    plain, _ = step()
    weightless, record = step(ttt_blocks=2, ttt_weight=0.0)
    unrolled, record = step(ttt_blocks=2)
    assert len(record["ttt_acc"]) == 2 and float(weightless.total.detach()) == pytest.approx(float(plain.total.detach()))
    assert float(unrolled.total.detach()) > float(plain.total.detach())
    with pytest.raises(ValueError, match="vocab"):
        csgd_step(model, embed, head, vocab_index, batch, TrainConfig(data="", out="", ttt_blocks=1), 0.0,
                  torch.Generator().manual_seed(1))
    with pytest.raises(ValueError, match=">= 0"):
        TrainConfig(data="", out="", ttt_blocks=-1)
    with pytest.raises(ValueError, match="--kind sar"):
        TrainConfig(data="", out="", kind="medusa", ttt_blocks=1)


def test_rollout_starts_need_greedy_assistant_windows():
    s = sample(list(range(10, 30)), [0] * 6 + [1] * 14)
    s["target_tokens"] = torch.cat([s["input_ids"][1:], torch.tensor([0])])  # the data is the greedy continuation
    assert rollout_starts(s, 2, 4).tolist() == list(range(5, 16))
    s["target_tokens"][12] = 0  # the target would not say x_13: no window x_{t+1..t+4} may contain it
    assert rollout_starts(s, 2, 4).tolist() == [5, 6, 7, 8, 13, 14, 15]


def test_rollout_starts_of_answer_openings():
    s = sample(list(range(10, 40)), [0] * 4 + [1] * 8 + [0] * 6 + [1] * 12)  # answers at 4-11 and 18-29
    s["target_tokens"] = torch.cat([s["input_ids"][1:], torch.tensor([0])])
    assert rollout_starts(s, 2, 2).tolist() == list(range(3, 10)) + list(range(17, 28))
    assert rollout_starts(s, 2, 2, opening=3).tolist() == [3, 4, 5, 17, 18, 19]  # x_{t+1} among an answer's first 3
    assert rollout_starts(s, 2, 2, opening=100).tolist() == rollout_starts(s, 2, 2).tolist()


def test_overfitting_a_few_conversations_lowers_the_loss(tiny_data):
    out = tiny_data / "overfit"
    cfg = TrainConfig(data=str(tiny_data / "train"), out=str(out), eval_data=str(tiny_data / "train"),
                      model=str(tiny_data / "tiny"), max_steps=60, eval_every=60, save_every=60, log_every=10,
                      draft_vocab=48, lr=3e-3, warmup=5, batch_size=4, eval_samples=4)
    with pytest.raises(ValueError, match="shares"):
        train(cfg)  # evaluating on training conversations is refused ...
    cfg.eval_data = ""  # ... so over-fit and evaluate on the last 4 training samples via a fresh directory
    cfg.data = str(tiny_data / "train")
    cfg.eval_samples = 2
    train(cfg)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["total"] for r in records if "total" in r]
    assert losses[-1] < 0.6 * losses[0]
    recipe = json.loads((out / "drafter" / "recipe.json").read_text())
    assert recipe["config"]["max_steps"] == 60 and recipe["data"]["mode"] == "self-distilled"
    drafter = SARDrafterModel.from_pretrained(out / "drafter", tiny_target("llama"))
    assert drafter.config.draft_vocab_size == 48 and drafter.k == 2


def test_newest_pair_trains_and_is_checked_on_resume(tiny_data):
    out = tiny_data / "newest"
    cfg = TrainConfig(data=str(tiny_data / "train"), out=str(out), eval_data=str(tiny_data / "held"),
                      model=str(tiny_data / "tiny"), max_steps=12, eval_every=12, save_every=12, log_every=4,
                      draft_vocab=48, lr=3e-3, warmup=2, batch_size=4, eval_samples=2, newest_pair=True)
    train(cfg)
    losses = [r["total"] for r in map(json.loads, (out / "log.jsonl").read_text().splitlines()) if "total" in r]
    assert losses[-1] < losses[0]
    drafter = SARDrafterModel.from_pretrained(out / "drafter", tiny_target("llama"))
    assert drafter.config.newest_pair and drafter.newest.weight.abs().sum() > 0, "the newest-pair Linear trained"
    cfg.newest_pair, cfg.max_steps = False, 14
    with pytest.raises(ValueError, match="newest_pair=True"):
        train(cfg)  # resuming with other settings is refused
    shutil.rmtree(out)


def test_chained_slots_train_and_grow_an_init_from_drafter(tiny_data, llama):
    """--chain-slots trains slot 1 conditioned on the true token of slot 0; added to an --init-from drafter it starts
    as that drafter (zero) and is refused on a resume that does not match."""
    base = tiny_data / "chain-base"
    common = dict(data=str(tiny_data / "train"), eval_data=str(tiny_data / "held"), model=str(tiny_data / "tiny"),
                  eval_every=6, save_every=6, log_every=2, draft_vocab=48, lr=3e-3, warmup=2, batch_size=4,
                  eval_samples=2)
    train(TrainConfig(out=str(base), max_steps=6, **common))
    target = tiny_target("llama")
    plain = SARDrafterModel.from_pretrained(base / "drafter", target)
    grown = plain.grown(chain_slots=True, newest_pair=True)
    assert grown.config.chain_slots and grown.config.newest_pair and plain.grown() is plain
    features, tokens = torch.randn(1, 7, plain.config.hidden_size), torch.randn(1, 7, plain.config.hidden_size)
    mask = relaxed_causal_mask(7, 0, 2, 1)
    out = grown(features, tokens, torch.arange(7)[None], mask, block_offset=1)
    torch.testing.assert_close(grown.chain_teacher_forced(out, tokens, 1),
                               plain(features, tokens, torch.arange(7)[None], mask), rtol=0, atol=0)
    with pytest.raises(ValueError, match="only newest_pair and chain_slots"):
        plain.grown(k=3)
    out = tiny_data / "chain"
    train(TrainConfig(out=str(out), max_steps=6, init_from=str(base / "drafter"), chain_slots=True, **common))
    drafter = SARDrafterModel.from_pretrained(out / "drafter", target)
    assert drafter.config.chain_slots and drafter.chain.down.weight.abs().sum() > 0, "the chain trained"
    with pytest.raises(ValueError, match="chain_slots=True"):
        train(TrainConfig(out=str(out), max_steps=8, init_from=str(base / "drafter"), **common))
    with pytest.raises(ValueError, match="--init-from .* chain_slots=True"):
        train(TrainConfig(out=str(tiny_data / "chain-2"), max_steps=6, init_from=str(out / "drafter"), **common))
    with pytest.raises(ValueError, match="k >= 2"):
        SARDrafterModel.for_target(llama, k=1, chain_slots=True)
    for path in (base, out):
        shutil.rmtree(path)


def test_num_layers_grows_an_init_from_drafter_that_drafts_as_before(tiny_data):
    """--num-layers above an --init-from drafter's appends copies of its last layer whose output projections start
    at zero: the grown drafter computes exactly what it grew from, then trains (with --grown-lr, the grown layer at
    a rate of its own, also after a resume); a drafter never shrinks."""
    base = tiny_data / "layers-base"
    common = dict(data=str(tiny_data / "train"), eval_data=str(tiny_data / "held"), model=str(tiny_data / "tiny"),
                  eval_every=6, save_every=6, log_every=2, draft_vocab=48, lr=3e-3, warmup=2, batch_size=4,
                  eval_samples=2, newest_pair=True, chain_slots=True)
    train(TrainConfig(out=str(base), max_steps=6, **common))
    target = tiny_target("llama")
    one = SARDrafterModel.from_pretrained(base / "drafter", target)
    two = one.with_layers(2)
    assert two.config.num_layers == 2 and one.with_layers(1) is one
    assert not two.layers[1].self_attn.o_proj.weight.any() and not two.layers[1].mlp.down_proj.weight.any()
    torch.testing.assert_close(two.layers[1].self_attn.q_proj.weight, one.layers[0].self_attn.q_proj.weight)
    features, tokens = torch.randn(1, 7, one.config.hidden_size), torch.randn(1, 7, one.config.hidden_size)
    args = (features, tokens, torch.arange(7)[None], relaxed_causal_mask(7, 0, 2, 1))
    torch.testing.assert_close(two(*args, block_offset=1), one(*args, block_offset=1), rtol=0, atol=0)
    with pytest.raises(ValueError, match="can only grow"):
        two.with_layers(1)
    out = tiny_data / "layers-2"
    cfg = TrainConfig(out=str(out), max_steps=6, init_from=str(base / "drafter"), num_layers=2, grown_lr=3e-2,
                      **common)
    train(cfg)
    grown = SARDrafterModel.from_pretrained(out / "drafter", target)
    assert grown.config.num_layers == 2 and grown.layers[1].mlp.down_proj.weight.abs().sum() > 0, "it trained"
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert state["grown"] and all(name.startswith("layers.1.") for name in state["grown"])
    rest, new = state["optimizer"]["param_groups"]  # --grown-lr: the grown layer's rate is 10x the rest's
    assert len(new["params"]) == len(state["grown"]) and new["lr"] == pytest.approx(10 * rest["lr"])
    with pytest.raises(ValueError, match="same --grown-lr"):
        train(dataclasses.replace(cfg, max_steps=8, grown_lr=0.0))
    train(dataclasses.replace(cfg, max_steps=8))  # resumed: grouped as it started
    assert torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"] == 8
    with pytest.raises(ValueError, match="--grown-lr must be >= 0"):
        TrainConfig(data="", out="", grown_lr=-1.0)
    with pytest.raises(ValueError, match="--init-from .* num_layers=2"):
        train(TrainConfig(out=str(tiny_data / "layers-1"), max_steps=6, init_from=str(out / "drafter"), **common))
    for path in (base, out):
        shutil.rmtree(path)


def test_newest_slots_teacher_forced_slots_are_the_drafted_ones(llama):
    """A teacher-forced causal pass of a newest-slots drafter gives, at every position j, the k slots drafting
    reads from a block whose newest position is j: o_j, then o_j chained on the true token x_{j+i+1}."""
    torch.manual_seed(0)
    model = SARDrafterModel.for_target(llama, k=3, num_layers=1, chain_slots=True, newest_slots=True).eval()
    with torch.no_grad():
        model.chain.down.weight.normal_(0, 0.5)
    features, ids = torch.randn(1, 9, llama.hidden_size), torch.randint(4, 100, (1, 9))
    embeds = model.embed(llama.model.get_input_embeddings(), ids)
    args = (features, embeds, torch.arange(9)[None], relaxed_causal_mask(9, 0, 1))
    out, slots = model(*args), model(*args, chain_embeds=embeds)
    assert slots.shape == (1, 9, 3, llama.hidden_size)
    for j in range(7):
        torch.testing.assert_close(slots[0, j, 0], out[0, j])
        for i in (1, 2):
            torch.testing.assert_close(slots[0, j, i], model.chain(out[0, j], embeds[0, j + i]))
    model(*args, chain_embeds=embeds, detach_chain=True)[:, :, 1:].sum().backward()  # later slots only
    assert all(not p.grad.any() for p in model.layers.parameters()), "--detach-chain: the decoder learns slot 0 alone"
    assert model.chain.up.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="add --newest-slots"):
        TrainConfig(data="", out="", detach_chain=True)


def test_chain_attention_reads_what_the_newest_position_sees(llama):
    """--chain-attention: slot 1 of position j is o_j plus what a query at position j + 1 made of o_j and the true
    token x_{j+2} reads from the last layer's keys and values at positions <= j (a cached pass over the prefix, by
    hand), then the chain; with --detach-chain its loss trains the attention and the chain, never the decoder."""
    import math

    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    model = SARDrafterModel.for_target(llama, k=2, num_layers=2, chain_slots=True, newest_slots=True,
                                       chain_attention=True).eval()
    attention = model.chain_attention
    with torch.no_grad():
        model.chain.down.weight.normal_(0, 0.5)
        attention.out.weight.normal_(0, 0.5)
    features, ids = torch.randn(1, 9, llama.hidden_size), torch.randint(4, 100, (1, 9))
    embeds = model.embed(llama.model.get_input_embeddings(), ids)
    args = (features, embeds, torch.arange(9)[None], relaxed_causal_mask(9, 0, 1))
    with torch.no_grad():
        out, slots = model(*args), model(*args, chain_embeds=embeds)
        heads, dim = attention.heads, attention.head_dim
        for j in range(8):
            cache = model.new_cache()
            o = model(features[:, : j + 1], embeds[:, : j + 1], torch.arange(j + 1)[None],
                      relaxed_causal_mask(j + 1, 0, 1), cache)[0, -1]
            keys, values = (x[0].repeat_interleave(heads // x.shape[1], 0) for x in cache.layer_states(1))
            e = embeds[0, j + 1]
            q = attention.query(torch.cat([attention.output_norm(o), attention.token_norm(e)])).view(1, heads, 1, dim)
            q = apply_rotary_pos_emb(q, q, *model.rotary(q, torch.tensor([[j + 1]])))[0][0, :, 0]  # [heads, D]
            weights = ((keys @ q[..., None])[..., 0] / math.sqrt(dim)).softmax(-1)  # [heads, j + 1]
            read = (weights[..., None] * values).sum(1).reshape(-1)
            torch.testing.assert_close(slots[0, j, 0], out[0, j])
            torch.testing.assert_close(slots[0, j, 1], model.chain(o + attention.out(read), e))
    model(*args, chain_embeds=embeds, detach_chain=True)[:, :, 1:].sum().backward()
    assert all(not p.grad.any() for p in model.layers.parameters()), "the decoder learns slot 0 alone"
    assert attention.query.weight.grad.abs().sum() > 0 and model.chain.up.weight.grad.abs().sum() > 0
    head = SARDrafterModel.for_target(llama, k=1, num_layers=1)
    grown = head.with_newest_slots(2, chain_attention=True)  # zero-initialised: slot 1 is the plain chain's
    assert grown.chain_attention.out.weight.abs().sum() == 0
    with pytest.raises(ValueError, match="needs newest_slots"):
        SARDrafterModel.for_target(llama, k=2, chain_slots=True, chain_attention=True)
    with pytest.raises(ValueError, match="add --newest-slots"):
        TrainConfig(data="", out="", k=2, chain_attention=True)


def test_newest_slots_train_from_a_head_whose_first_slot_they_keep(tiny_data, llama):
    """--newest-slots trains every slot at every position; --init-from a k=1 head starts a drafter whose slot 0 is
    that head (same decoder, same outputs) and whose chain is zero; the flag is checked against its neighbours."""
    common = dict(data=str(tiny_data / "train"), eval_data=str(tiny_data / "held"), model=str(tiny_data / "tiny"),
                  eval_every=6, save_every=6, log_every=2, draft_vocab=48, lr=3e-3, warmup=2, batch_size=4,
                  eval_samples=2)
    head_dir = tiny_data / "newest-head"
    train(TrainConfig(out=str(head_dir), max_steps=6, k=1, **common))
    target = tiny_target("llama")
    head = SARDrafterModel.from_pretrained(head_dir / "drafter", target)
    grown = head.with_newest_slots(2)
    assert grown.k == 2 and grown.config.newest_slots and grown.chain.down.weight.abs().sum() == 0
    features, tokens = torch.randn(1, 7, head.config.hidden_size), torch.randn(1, 7, head.config.hidden_size)
    args = (features, tokens, torch.arange(7)[None], relaxed_causal_mask(7, 0, 1))
    torch.testing.assert_close(grown(*args), head(*args), rtol=0, atol=0)
    with pytest.raises(ValueError, match="only a plain k=1 head"):
        grown.with_newest_slots(2)
    out = tiny_data / "newest-slots"
    cfg = TrainConfig(out=str(out), max_steps=6, k=2, newest_slots=True, init_from=str(head_dir / "drafter"),
                      **common)
    assert cfg.chain_slots, "--newest-slots brings the chain"
    train(cfg)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(len(r["slot_acc"]) == 2 for r in records if "total" in r)
    assert any("acc@2" in r.get("eval", {}) for r in records)
    drafter = SARDrafterModel.from_pretrained(out / "drafter", target)
    assert drafter.config.newest_slots and drafter.chain.down.weight.abs().sum() > 0, "the chain trained"
    evals = [r["eval"] for r in records if "eval" in r]
    assert len(evals[-1]["slot_acc"]) == 2 and "acc@1" in evals[-1]
    attends = tiny_data / "newest-attention"  # the head grown with an attending chain
    train(TrainConfig(out=str(attends), max_steps=4, k=2, newest_slots=True, detach_chain=True,
                      chain_attention=True, init_from=str(head_dir / "drafter"), **common))
    evals = [json.loads(line)["eval"] for line in (attends / "log.jsonl").read_text().splitlines() if "eval" in line]
    assert len(evals[-1]["slot_acc"]) == 2 and "acc@2" in evals[-1]
    assert SARDrafterModel.from_pretrained(attends / "drafter", target).chain_attention.out.weight.abs().sum() > 0
    shutil.rmtree(attends)
    for bad, match in (({"k": 1}, "--k 2 or more"), ({"kind": "medusa"}, "--kind sar"),
                       ({"newest_pair": True}, "excludes --newest-pair"),
                       ({"every_alignment": True}, "excludes --every-alignment"),
                       ({"ttt_blocks": 2}, "excludes --ttt-blocks")):
        with pytest.raises(ValueError, match=match):
            TrainConfig(data="", out="", **{"k": 2, "newest_slots": True, **bad})
    with pytest.raises(ValueError, match="newest_slots=True"):  # a newest-slots drafter into the block layout
        train(TrainConfig(out=str(tiny_data / "newest-2"), max_steps=6, k=2, chain_slots=True,
                          init_from=str(out / "drafter"), **common))
    with pytest.raises(ValueError, match="needs chain_slots"):
        SARDrafterModel.for_target(llama, k=2, newest_slots=True)
    for path in (head_dir, out):
        shutil.rmtree(path)


def test_reversed_slots_targets_and_chained_tokens(llama):
    """--reversed-slots: in a block [q, q+1] the newest position q+1 drafts slot 0 (regresses h_{q+2}) and q drafts
    slot 1 (regresses h_{q+3}), chained on slot 0's true token x_{q+3}, the input token of position q+2."""
    from falconspec.train import reversed_slots_batch

    cfg = TrainConfig(data="", out="", k=2, reversed_slots=True, chain_slots=True, max_len=64)
    batch, offsets = reversed_slots_batch([sample(list(range(10, 22)), [0, 0] + [1] * 10)], cfg)
    assert offsets.tolist() == [0]
    assert batch.target_features[0, :8, 0].tolist() == [13, 12, 15, 14, 17, 16, 19, 18]  # h_{j+3}, h_{j+1}, ...
    assert batch.labels[0, :8].tolist() == [113, 112, 115, 114, 117, 116, 119, 118]
    assert batch.valid[0].tolist() == [True] * 8 + [False, True, False]  # x_{j+a+1} exists and is an answer token
    torch.manual_seed(0)
    model = SARDrafterModel.for_target(llama, k=2, chain_slots=True, reversed_slots=True).eval()
    with torch.no_grad():
        model.chain.down.weight.normal_(0, 0.5)
    outputs, embeds = torch.randn(1, 8, llama.hidden_size), torch.randn(1, 8, llama.hidden_size)
    chained = model.chain_teacher_forced(outputs, embeds, 0)
    for j in range(6):
        expected = model.chain(outputs[0, j], embeds[0, j + 2]) if j % 2 == 0 else outputs[0, j]
        torch.testing.assert_close(chained[0, j], expected)
    with pytest.raises(ValueError, match="excludes --later-slot-weight"):
        TrainConfig(data="", out="", k=2, reversed_slots=True, later_slot_weight=0.5)
    with pytest.raises(ValueError, match="--k 2 or more"):
        TrainConfig(data="", out="", k=1, reversed_slots=True)
    with pytest.raises(ValueError, match="excludes newest_slots"):
        SARDrafterModel.for_target(llama, k=2, chain_slots=True, newest_slots=True, reversed_slots=True)


def test_reversed_slots_train_end_to_end(tiny_data):
    out = tiny_data / "reversed"
    train(TrainConfig(data=str(tiny_data / "train"), out=str(out), eval_data=str(tiny_data / "held"),
                      model=str(tiny_data / "tiny"), max_steps=6, eval_every=6, save_every=6, log_every=2,
                      draft_vocab=48, lr=3e-3, warmup=2, batch_size=4, eval_samples=2, reversed_slots=True,
                      chain_slots=True, every_alignment=True))
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    losses = [r["total"] for r in records if "total" in r]
    assert len(losses) == 4 and losses[-1] < losses[0]  # steps 1, 2, 4, 6
    assert any("acc@2" in r.get("eval", {}) for r in records)
    drafter = SARDrafterModel.from_pretrained(out / "drafter", tiny_target("llama"))
    assert drafter.config.reversed_slots and drafter.chain.down.weight.abs().sum() > 0
    shutil.rmtree(out)


@pytest.mark.parametrize("extra", [{}, {"newest_pair": True, "chain_slots": True, "distill_topk": 8}])
def test_training_time_test_trains_end_to_end(tiny_data, extra):
    out = tiny_data / f"ttt{len(extra)}"
    cfg = TrainConfig(data=str(tiny_data / "train"), out=str(out), eval_data=str(tiny_data / "held"),
                      model=str(tiny_data / "tiny"), max_steps=6, eval_every=6, save_every=6, log_every=2,
                      draft_vocab=48, lr=3e-3, warmup=2, batch_size=4, eval_samples=2, ttt_blocks=2, **extra)
    train(cfg)
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert all(len(r["ttt_acc"]) == 2 for r in records if "total" in r)
    recipe = json.loads((out / "drafter" / "recipe.json").read_text())["config"]
    assert recipe["ttt_blocks"] == 2 and all(recipe[key] == value for key, value in extra.items())


def test_two_process_training_resumes_and_loads(tiny_data):
    out = tiny_data / "ddp"
    torchrun = Path(sys.executable).with_name("torchrun")
    cli = Path(sys.executable).with_name("falconspec")
    base = [str(torchrun), "--nproc_per_node", "2", "--rdzv-backend", "c10d", "--rdzv-endpoint", "localhost:0",
            str(cli), "train", "--data", str(tiny_data / "train"), "--eval-data", str(tiny_data / "held"),
            "--out", str(out), "--model", str(tiny_data / "tiny"), "--batch-size", "2", "--draft-vocab", "40",
            "--eval-every", "4", "--save-every", "4", "--warmup", "2", "--log-every", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(base + ["--max-steps", "4"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 4 and "acc@1" in state["history"][-1]
    run = subprocess.run(base + ["--max-steps", "6"], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "step" in r] == [1, 2, 3, 4, 5, 6]  # resumed at step 5, not restarted
    assert [r["eval"]["step"] for r in records if "eval" in r] == [4, 6]
    state = torch.load(out / "checkpoint" / "state.pt", weights_only=False)
    assert state["step"] == 6 and [x["start_step"] for x in state["sessions"]] == [0, 4]
    SARDrafterModel.from_pretrained(out / "drafter", tiny_target("llama"))
    with pytest.raises(DrafterMismatchError):
        SARDrafterModel.from_pretrained(out / "drafter", tiny_target("llama", hidden_size=32))
    shutil.rmtree(out)


@pytest.mark.parametrize("kind", ["sar", "medusa"])
def test_bfloat16_reaches_every_objectives_step(tiny_data, kind):
    """--dtype bfloat16 runs each step under bf16 autocast: the loop applies the objective's precision (the Medusa
    objective used to ignore it and train in float32)."""
    losses = {}
    for dtype in ("float32", "bfloat16"):
        out = tiny_data / f"{kind}-{dtype}"
        cfg = TrainConfig(data=str(tiny_data / "train"), out=str(out), eval_data=str(tiny_data / "held"),
                          model=str(tiny_data / "tiny"), kind=kind, medusa_heads=2, max_steps=1, eval_every=1,
                          save_every=1, log_every=1, draft_vocab=48, batch_size=4, eval_samples=2, dtype=dtype)
        train(cfg)
        losses[dtype] = [json.loads(line)["total"] for line in (out / "log.jsonl").read_text().splitlines()
                         if '"total"' in line][0]
    assert losses["float32"] != losses["bfloat16"]
    assert losses["bfloat16"] == pytest.approx(losses["float32"], rel=0.05)

