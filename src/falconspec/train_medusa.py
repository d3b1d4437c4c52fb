"""Train Medusa heads on gen-data shards (``falconspec train --kind medusa``): :class:`MedusaObjective` in the one
training loop (:mod:`.trainer`), with the same data and vocabulary as the CSGD objective (:mod:`.train`) and a
simpler loss.

Head i at position j reads h_j and guesses x_{j+2+i}. Its target distribution is the target's own at position
j+1+i, softmax(LM_head(h_{j+1+i})), taken from the stored features; its label is the target's greedy token there.
The loss is kl_weight * KL(target || head) + (1 - kl_weight) * CE(greedy) on the draft vocabulary, averaged over
heads and over positions whose guessed token is assistant text. Held-out: per-depth chain accuracy acc@d (heads
0..d-1 all equal the target's greedy tokens), at the positions where the data follows those tokens.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from .train_common import (
    ShardObjective, TrainConfig, chain_accuracy, distillation_losses, draft_index, draft_vocabulary, rollout_starts,
)
from .trainer import Objective, Progress, StepResult

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
    B, L, _ = valid.shape
    # the target's logits at h_{j+1+i}: up to K heads read the same position, so each is projected once
    rows, where = (torch.arange(B)[:, None, None] * L + batch["source"])[valid].unique(return_inverse=True)
    target_logits = F.linear(batch["features"].reshape(B * L, -1)[rows], head)[where]  # [n, D]
    label = draft_index(batch["labels"][valid], vocab_index)
    kl, ce, draft_logp = distillation_losses(F.linear(guesses[valid].float(), head), target_logits, label)
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
        # x_{j+1..j+K+1}, the root x_{j+1} and the K guessed tokens, are scored
        j = rollout_starts(s, 0, K + 1, cfg.eval_answer_opening)
        if len(j) == 0:
            continue
        guesses = model(s["hidden_states"].float()[j])  # [n, K, H]
        drafted = vocab[F.linear(guesses.float(), head).argmax(-1)]  # [n, K]
        truth = s["target_tokens"].long()[j[:, None] + 1 + torch.arange(K)[None]]
        chains.append((drafted == truth).long().cumprod(1))
    return chain_accuracy(chains)


class MedusaObjective(ShardObjective, Objective):
    """Medusa heads on gen-data shards (``falconspec train --kind medusa --medusa-heads K``), one process."""

    name = "medusa"

    def load(self, directory, target):
        from .drafters.medusa import MedusaHeads

        return MedusaHeads.from_pretrained(directory, target)

    def check(self, model, why: str, source) -> None:
        if why == "resume" and model.config.num_heads != self.config.medusa_heads:
            raise ValueError(f"{source} holds {model.config.num_heads} heads: resume with --medusa-heads "
                             f"{model.config.num_heads} or use a new --out")

    def fresh(self, target):
        from .drafters.medusa import MedusaHeads

        cfg = self.config
        torch.manual_seed(cfg.seed)
        return MedusaHeads.for_target(target, cfg.medusa_heads, draft_vocabulary(self.train_samples, target, cfg))

    def step(self, model, step: int, rank: int, world: int) -> StepResult:
        cfg = self.config
        batch = head_targets(self.batch_samples(step, rank, world), cfg.medusa_heads, cfg.max_len)
        losses = medusa_losses(model, batch, self.head, self.vocab_index, cfg.kl_weight)
        return StepResult(losses["total"], details=losses)

    def train_record(self, result: StepResult, progress: Progress) -> dict:
        losses = result.details
        return {"step": progress.step, "lr": progress.lr, "total": round(float(losses["total"].detach()), 4),
                "acc": [round(float(a), 4) for a in losses["acc"].detach()], "positions": losses["count"],
                "grad_norm": progress.grad_norm, "seconds": round(progress.seconds, 1)}

    def evaluate(self, model) -> dict:
        return evaluate_medusa(model, self.head, self.vocab, self.eval_samples, self.config)

    def describe(self, model) -> str:
        return (f"{self.config.medusa_heads} Medusa heads ({model.num_parameters() / 1e6:.2f}M params, draft vocab "
                f"{len(self.vocab)}) on {len(self.train_samples)} samples, eval on {len(self.eval_samples)}")
