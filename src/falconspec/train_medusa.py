"""Train Medusa heads on gen-data shards (``falconspec train --kind medusa``): the same data, vocabulary, schedule,
checkpointing and run directory as the CSGD trainer (:mod:`.train`), with a simpler loss.

Head i at position j reads h_j and guesses x_{j+2+i}. Its target distribution is the target's own at position
j+1+i, softmax(LM_head(h_{j+1+i})), taken from the stored features; its label is the target's greedy token there.
The loss is kl_weight * KL(target || head) + (1 - kl_weight) * CE(greedy) on the draft vocabulary, averaged over
heads and over positions whose guessed token is assistant text. Held-out: per-depth chain accuracy acc@d (heads
0..d-1 all equal the target's greedy tokens), at the positions where the data follows those tokens.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn.functional as F

from .train_common import (
    TrainConfig, batch_indices, describe_slice, draft_vocabulary, load_data, log_record, lr_at, resolve_init_from,
    save_checkpoint,
)

log = logging.getLogger(__name__)


def head_targets(samples: list[dict], num_heads: int, max_len: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors for a batch: features [B, L, H]; per head the position of the target feature
    [B, L, K] (j+1+i), its greedy label [B, L, K] and whether it is trained on [B, L, K]."""
    samples = [{key: v[:max_len] for key, v in s.items()} for s in samples]
    width, hidden = max(len(s["input_ids"]) for s in samples), samples[0]["hidden_states"].shape[-1]
    B, K = len(samples), num_heads
    features = torch.zeros(B, width, hidden)
    labels = torch.full((B, width, K), -1, dtype=torch.long)
    valid = torch.zeros(B, width, K, dtype=torch.bool)
    source = torch.zeros(B, width, K, dtype=torch.long)
    j = torch.arange(width)
    for b, s in enumerate(samples):
        L = len(s["input_ids"])
        features[b, :L] = s["hidden_states"].float()
        for i in range(K):
            guessed = j + 2 + i  # the token head i guesses at position j
            ok = guessed < L
            src = (j + 1 + i).clamp(max=L - 1)
            source[b, :, i] = src
            labels[b, :, i] = torch.where(ok, s["target_tokens"].long()[src], -1)
            valid[b, :, i] = ok & s["loss_mask"].bool()[guessed.clamp(max=L - 1)]
    return {"features": features, "source": source, "labels": labels, "valid": valid}


def medusa_losses(model, batch: dict, head: torch.Tensor, vocab_index: torch.Tensor, kl_weight: float) -> dict:
    """KL + CE over the valid (position, head) pairs; returns the loss and per-head top-1 accuracy."""
    valid = batch["valid"]
    if not valid.any():
        zero = sum(p.sum() for p in model.parameters()) * 0
        return {"total": zero, "acc": torch.zeros(valid.shape[-1]), "count": 0}
    guesses = model(batch["features"])  # [B, L, K, H]
    b_idx = torch.arange(valid.shape[0])[:, None, None].expand_as(valid)
    true = batch["features"][b_idx, batch["source"]][valid]  # [n, H] h_{j+1+i}
    draft_logp = F.linear(guesses[valid].float(), head).log_softmax(-1)  # [n, D]
    target_logp = F.linear(true, head).log_softmax(-1)
    kl = (target_logp.exp() * (target_logp - draft_logp)).sum(-1).mean()
    label = vocab_index[batch["labels"][valid].clamp(min=0)]
    has = label >= 0
    ce = F.nll_loss(draft_logp[has], label[has]) if has.any() else kl * 0
    hits = torch.zeros(valid.shape, dtype=torch.float)
    hits[valid] = (draft_logp.argmax(-1) == label).float()
    acc = hits.sum((0, 1)) / valid.sum((0, 1)).clamp(min=1)  # [K]
    return {"total": kl_weight * kl + (1 - kl_weight) * ce, "acc": acc, "count": int(valid.sum())}


@torch.no_grad()
def evaluate_medusa(model, head, vocab, samples: list[dict], cfg: TrainConfig) -> dict:
    """acc@d: the share of positions where heads 0..d-1 all guess the target's greedy tokens, over positions
    whose next K tokens are assistant text following those greedy tokens (as when the target drafts its own answer)."""
    K, chains = model.config.num_heads, []
    for s in samples:
        s = {key: v[: cfg.max_len] for key, v in s.items()}
        ids, greedy, mask = s["input_ids"].long(), s["target_tokens"].long(), s["loss_mask"].bool()
        L = len(ids)
        j = torch.arange(0, max(L - K - 1, 0))
        if len(j) == 0:
            continue
        window = j[:, None] + 1 + torch.arange(K + 1)[None]  # positions j+1 .. j+K+1
        ok = mask[window].all(-1) & (ids[window] == greedy[window - 1]).all(-1)
        j = j[ok]
        if len(j) == 0:
            continue
        guesses = model(s["hidden_states"].float()[j])  # [n, K, H]
        drafted = vocab[F.linear(guesses.float(), head).argmax(-1)]  # [n, K]
        truth = greedy[j[:, None] + 1 + torch.arange(K)[None]]
        chains.append((drafted == truth).long().cumprod(1))
    if not chains:
        return {}
    acc = torch.cat(chains).float().mean(0)
    return {**{f"acc@{d + 1}": round(float(acc[d]), 4) for d in range(K)}, "rollouts": sum(len(c) for c in chains)}


def train_medusa(cfg: TrainConfig) -> Path:
    """Train (or resume) Medusa heads; single process. Returns the final drafter directory."""
    from .drafters.medusa import MedusaHeads
    from .models import load_target

    out, ckpt = Path(cfg.out), Path(cfg.out) / "checkpoint"
    target = load_target(cfg.model)
    train_samples, eval_samples, data_meta = load_data(cfg, target.hidden_size)
    state = None
    if (ckpt / "state.pt").exists():
        model = MedusaHeads.from_pretrained(ckpt, target)
        if model.config.num_heads != cfg.medusa_heads:
            raise ValueError(f"{ckpt} holds {model.config.num_heads} heads: resume with --medusa-heads "
                             f"{model.config.num_heads} or use a new --out")
        state = torch.load(ckpt / "state.pt", weights_only=False)
    elif cfg.init_from:
        model = MedusaHeads.from_pretrained(resolve_init_from(cfg), target)
    else:
        torch.manual_seed(cfg.seed)
        model = MedusaHeads.for_target(target, cfg.medusa_heads, draft_vocabulary(train_samples, target, cfg))
    head = model.head_weight(target.lm_head.weight.detach()).float()  # [D, H]
    vocab = model.draft_vocab if model.draft_vocab is not None else torch.arange(target.vocab_size)
    vocab_index = torch.full((target.vocab_size,), -1, dtype=torch.long)
    vocab_index[vocab] = torch.arange(len(vocab))
    del target
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    step, history = 0, []
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step, history = state["step"], state["history"]
    out.mkdir(parents=True, exist_ok=True)
    log.info("training %d Medusa heads (%.2fM params, draft vocab %d) on %d samples, eval on %d",
             cfg.medusa_heads, model.num_parameters() / 1e6, len(vocab), len(train_samples), len(eval_samples))
    t0 = time.time()
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        picked = [train_samples[i] for i in batch_indices(len(train_samples), step, cfg, 0, 1)]
        losses = medusa_losses(model, head_targets(picked, cfg.medusa_heads, cfg.max_len), head, vocab_index,
                               cfg.kl_weight)
        losses["total"].backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip) if cfg.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        if step % cfg.log_every == 0 or step == 1:
            log_record(out, {"step": step, "lr": lr, "total": round(float(losses["total"].detach()), 4),
                       "acc": [round(float(a), 4) for a in losses["acc"].detach()], "positions": losses["count"],
                       "grad_norm": None if grad_norm is None else float(grad_norm),
                       "seconds": round(time.time() - t0, 1)})
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            model.eval()
            history.append({"step": step, **evaluate_medusa(model, head, vocab, eval_samples, cfg)})
            model.train()
            log_record(out, {"eval": history[-1]})
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            save_checkpoint(ckpt, model, {"optimizer": optimizer.state_dict(), "step": step, "history": history,
                                          "config": asdict(cfg)})
    final = out / "drafter"
    model.save_pretrained(final)
    recipe = {"command": " ".join(["falconspec"] + sys.argv[1:]), "config": asdict(cfg), "data": data_meta,
              "data_slice": describe_slice(data_meta), "seed": cfg.seed, "train_samples": len(train_samples),
              "eval_samples": len(eval_samples), "processes": 1, "parameters": model.num_parameters(),
              "history": history, "final": history[-1] if history else {}}
    (final / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    return final
