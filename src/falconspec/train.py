"""Coupled Sequential Glancing Distillation (CSGD): train a SAR drafter on gen-data shards (nanoGPT-shaped).

One step: (1) pass 1 without gradients; (2) Hamming distance d between the drafter's and the target's greedy tokens
over trained positions, per sample; (3) glance N = floor(lambda * d) positions (lambda decays over training): their
inputs become the ground truth of position j+k, and their own losses are dropped; (4) pass 2 with gradients;
(5) SmoothL1 feature regression + distillation (KL(target || drafter) and CE to the target's greedy token, both on
the draft vocabulary); AdamW, warmup + cosine decay, gradient-norm clipping. ``glance=False`` is plain token-shift
training; ``k=1`` trains an EAGLE-style head (glancing needs k >= 2 and is skipped).

Run directory: ``log.jsonl`` (train and eval records), ``checkpoint/`` (drafter files + ``state.pt`` with optimizer,
scheduler and step; resumed automatically), ``drafter/`` (the final drafter + ``recipe.json``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _opt(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainConfig:
    data: str  # gen-data directory
    out: str  # run directory
    eval_data: str = _opt("", "gen-data directory of held-out conversations (default: the last --eval-samples of "
                              "--data)")
    model: str = _opt("smollm2-135m", "target model the data was generated with")
    kind: str = _opt("sar", "sar: a SAR drafter trained with CSGD (--k 2: Falcon, --k 1: EAGLE-style head); medusa: "
                            "Medusa heads (--medusa-heads)")
    k: int = _opt(2, "tokens per drafter forward: 2 = Falcon SAR drafter, 1 = EAGLE-style head")
    medusa_heads: int = _opt(4, "number of Medusa heads (--kind medusa)")
    num_layers: int = _opt(1, "drafter decoder layers")
    init_from_target: bool = _opt(False, "initialize the drafter's decoder layers from the target's last layers")
    init_from: str = _opt("", "start from this trained drafter directory, or falcon/eagle/medusa for the one shipped "
                              "with --model (its weights and draft vocabulary; a fresh optimizer and schedule)")
    draft_vocab: int = _opt(8192, "draft vocabulary size: most frequent target tokens of the data (0 = full)")
    vocab_corpus: str = _opt("", "also count tokens of the assistant turns of this conversation source ('sharegpt' "
                                 "or a file; training split only) when choosing the draft vocabulary")
    vocab_corpus_limit: int = _opt(1000, "conversations of --vocab-corpus to count")
    glance: bool = _opt(True, "CSGD glancing (--no-glance: plain token-shift training, the paper's ablation)")
    glance_start: float = _opt(0.4, "glance ratio lambda at step 0, decayed linearly")
    glance_end: float = _opt(0.0, "glance ratio lambda at the last step")
    max_steps: int = _opt(1000, "optimizer steps")
    batch_size: int = _opt(4, "sequences per step and process")
    max_len: int = _opt(512, "tokens per training sequence (longer ones are cut)")
    lr: float = _opt(3e-4, "peak learning rate")
    min_lr: float = _opt(3e-5, "learning rate at the end of the cosine decay")
    warmup: int = _opt(50, "linear warmup steps")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    grad_clip: float = _opt(1.0, "gradient norm clip (0 = off)")
    dtype: str = _opt("float32", "float32, or bfloat16 autocast (fast only on CPUs/GPUs with native bf16)")
    reg_weight: float = _opt(1.0, "weight of the SmoothL1 feature regression")
    dist_weight: float = _opt(0.1, "weight of the distillation loss")
    kl_weight: float = _opt(0.9, "share of KL(target || drafter) in the distillation loss; the rest is CE to the "
                                  "target's greedy token")
    temperature: float = _opt(1.0, "distillation temperature (both distributions)")
    feature_noise: float = _opt(0.1, "uniform noise U(-x, x) added to input features (train only)")
    eval_every: int = _opt(100, "held-out evaluation (loss, acc@1..8) every N steps")
    eval_samples: int = _opt(32, "held-out sequences per evaluation")
    save_every: int = _opt(200, "checkpoint every N steps")
    log_every: int = _opt(10, "training log line every N steps")
    seed: int = _opt(0, "seed for data order, noise and glancing")


# ----------------------------------------------------------------------------- batches
@dataclass
class Batch:
    """A right-padded batch of S = L_max - 1 drafter positions. Position j pairs feature h_j with token x_{j+1} and
    regresses h_{j+k}, whose greedy token (the target's prediction of x_{j+k+1}) is the label."""
    features: torch.Tensor  # [B, S, H] input features h_j
    tokens: torch.Tensor  # [B, S] input tokens x_{j+1}
    target_features: torch.Tensor  # [B, S, H] h_{j+k} (zero past the end)
    labels: torch.Tensor  # [B, S] the target's greedy token at j+k (-1 past the end)
    valid: torch.Tensor  # [B, S] bool: trained on (x_{j+k+1} is an assistant token)
    key_padding: torch.Tensor  # [B, S] bool: real position
    next_features: torch.Tensor  # [B, S, H] the clean ground-truth input of position j+k (= target_features)
    next_tokens: torch.Tensor  # [B, S] x_{j+k+1}, the ground-truth input token of position j+k

    def to(self, device) -> Batch:
        return Batch(**{name: value.to(device) for name, value in self.__dict__.items()})


def make_batch(samples: list[dict], k: int, max_len: int) -> Batch:
    """Collate gen-data samples (see :class:`falconspec.data.ShardDataset`) for a drafter with block size k."""
    samples = [{key: v[:max_len] for key, v in s.items()} for s in samples]
    width = max(len(s["input_ids"]) for s in samples)
    hidden = samples[0]["hidden_states"].shape[-1]
    n, S = len(samples), width - 1

    def pad(key: str, shape: tuple, fill, dtype) -> torch.Tensor:
        out = torch.full((n, *shape), fill, dtype=dtype)
        for i, s in enumerate(samples):
            out[i, : len(s[key])] = s[key].to(dtype)
        return out

    h = pad("hidden_states", (width, hidden), 0.0, torch.float32)  # [B, L, H]
    ids = pad("input_ids", (width,), 0, torch.long)
    mask = pad("loss_mask", (width,), 0, torch.bool)
    greedy = pad("target_tokens", (width,), -1, torch.long)
    lengths = torch.tensor([len(s["input_ids"]) for s in samples])
    j = torch.arange(S)
    ahead = j + k  # position whose feature position j regresses
    in_range = (ahead[None] + 1) < lengths[:, None]  # x_{j+k+1} exists
    take = ahead.clamp(max=width - 1)
    target_features = torch.where(in_range[..., None], h[:, take], 0.0)
    next_tokens = torch.where(in_range, ids[:, (take + 1).clamp(max=width - 1)], 0)
    return Batch(
        features=h[:, :S], tokens=ids[:, 1:], target_features=target_features,
        labels=torch.where(in_range, greedy[:, take], -1),
        valid=in_range & mask[:, (take + 1).clamp(max=width - 1)], key_padding=j[None] < (lengths[:, None] - 1),
        next_features=target_features, next_tokens=next_tokens,
    )


# ----------------------------------------------------------------------------- glancing
def glance_ratio(step: int, cfg: TrainConfig) -> float:
    """lambda decays linearly from glance_start to glance_end over training."""
    return cfg.glance_start + (cfg.glance_end - cfg.glance_start) * min(step / max(cfg.max_steps, 1), 1.0)


def choose_glances(valid: torch.Tensor, mismatches: torch.Tensor, block_offset: torch.Tensor, ratio: float, k: int,
                   generator: torch.Generator) -> torch.Tensor:
    """[B, S] bool: the positions whose inputs are replaced by ground truth.

    Per sample, N = floor(ratio * d) positions with d = the Hamming distance (``mismatches`` [B], pass-1 greedy
    tokens vs the target's over trained positions). Only the first slot of a block is eligible: its block-mates
    then see the exact autoregressive context for their own targets, and no earlier slot sees a later one's truth.
    """
    slot = (torch.arange(valid.shape[1])[None] + block_offset[:, None]) % k
    eligible = valid & (slot == 0)
    chosen = torch.zeros_like(valid)
    for b in range(valid.shape[0]):
        candidates = eligible[b].nonzero().flatten()
        count = min(int(ratio * int(mismatches[b])), len(candidates))
        if count > 0:
            pick = torch.randperm(len(candidates), generator=generator)[:count]
            chosen[b, candidates[pick]] = True
    return chosen


def apply_glances(batch: Batch, chosen: torch.Tensor, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs with the chosen positions set to the ground-truth input of position j+k: (h_{j+k}, x_{j+k+1})."""
    features = torch.where(chosen[..., None], batch.next_features, features)
    tokens = torch.where(chosen, batch.next_tokens, batch.tokens)
    return features, tokens


# ----------------------------------------------------------------------------- losses
@dataclass
class Losses:
    total: torch.Tensor
    reg: torch.Tensor
    kl: torch.Tensor
    ce: torch.Tensor
    acc: torch.Tensor  # greedy draft token == target's greedy token, over trained positions
    count: int


def draft_index(labels: torch.Tensor, vocab_index: torch.Tensor) -> torch.Tensor:
    """Target token ids -> draft-vocabulary indices (-1 where the token is outside the draft vocabulary)."""
    return vocab_index[labels.clamp(min=0)].masked_fill(labels < 0, -1)


def compute_losses(outputs: torch.Tensor, batch: Batch, valid: torch.Tensor, head: torch.Tensor,
                   vocab_index: torch.Tensor, cfg: TrainConfig) -> Losses:
    """SmoothL1(o_j, h_{j+k}) + dist_weight * (kl_weight * KL(target || drafter) + (1 - kl_weight) * CE(greedy)),
    averaged over the ``valid`` [B, S] positions. Both distributions live on the draft vocabulary (``head`` [D, H])."""
    if not valid.any():  # nothing to learn here (keeps the graph, so distributed backward still syncs)
        zero = outputs.sum() * 0
        return Losses(zero, zero, zero, zero, zero.detach(), 0)
    pred = outputs[valid].float()  # [n, H]
    true = batch.target_features[valid]
    reg = F.smooth_l1_loss(pred, true, reduction="none").mean(-1).mean()
    draft_logits = F.linear(pred, head) / cfg.temperature  # [n, D]
    target_logits = F.linear(true, head) / cfg.temperature
    target_logp = target_logits.log_softmax(-1)
    draft_logp = draft_logits.log_softmax(-1)
    kl = (target_logp.exp() * (target_logp - draft_logp)).sum(-1).mean()
    label = draft_index(batch.labels[valid], vocab_index)
    has_label = label >= 0
    ce = F.nll_loss(draft_logp[has_label], label[has_label]) if has_label.any() else draft_logp.sum() * 0
    dist = cfg.kl_weight * kl + (1 - cfg.kl_weight) * ce
    acc = (draft_logits.argmax(-1) == label).float().mean()
    return Losses(cfg.reg_weight * reg + cfg.dist_weight * dist, reg, kl, ce, acc, int(valid.sum()))


# ----------------------------------------------------------------------------- held-out rollout accuracy
def rollout_starts(sample: dict, k: int, depth: int) -> torch.Tensor:
    """Positions t where drafting x_{t+1..t+depth} can be scored: the root x_t and k earlier features exist, the
    window is assistant text, and the data follows the target's greedy tokens in it (so the target's answer to
    every drafted prefix is known)."""
    ids, greedy, mask = sample["input_ids"].long(), sample["target_tokens"].long(), sample["loss_mask"].bool()
    L = len(ids)
    t = torch.arange(k, max(L - depth, k))
    if len(t) == 0:
        return t
    window = t[:, None] + torch.arange(1, depth + 1)[None]  # [n, depth] positions of x_{t+1..t+depth}
    ok = mask[window].all(-1) & (ids[window] == greedy[window - 1]).all(-1)
    return t[ok]


@torch.no_grad()
def rollout(model, embed: torch.Tensor, head: torch.Tensor, vocab: torch.Tensor, sample: dict, starts: torch.Tensor,
            depth: int) -> torch.Tensor:
    """Draft ``depth`` tokens after each start t the way the drafter runs at inference: one pass over the prefix
    (the last k outputs form one block ending at t-1), then passes that feed back the drafter's own k predicted
    features and tokens as a new block. All starts share one prefix pass per block alignment. Returns [n, depth]
    bool: drafted token == the target's greedy token."""
    from .drafters.sar_model import additive_mask, relaxed_causal_mask

    k, S, dev = model.k, len(sample["input_ids"]) - 1, head.device  # index bookkeeping stays on the CPU
    h = sample["hidden_states"].float()[None, :S].to(dev)  # [1, S, H]
    ids = sample["input_ids"].long()
    greedy = sample["target_tokens"].long()
    hits = torch.zeros(len(starts), depth, dtype=torch.bool)
    for offset in range(k):
        pick = ((starts + offset) % k == 0).nonzero().flatten()
        if len(pick) == 0:
            continue
        t, n = starts[pick], len(pick)
        cache = model.new_cache()
        mask = relaxed_causal_mask(S, 0, k, block_offset=offset, device=dev)
        out = model(h, model.embed(embed, ids[None, 1 : S + 1]), torch.arange(S, device=dev)[None], mask, cache)[0]
        feats = out[t[:, None] - k + torch.arange(k)[None]]  # [n, k, H]: predicted h_t .. h_{t+k-1}
        drafted = [vocab[F.linear(feats.float(), head).argmax(-1)]]  # [n, k]
        owner = torch.arange(n).repeat_interleave(k)  # start of each query in a feedback block
        prefix_ok = torch.arange(S)[None] < t.repeat_interleave(k)[:, None]  # [Q, S]
        new_keys = torch.zeros(n * k, 0, dtype=torch.bool)
        for p in range(1, -(-depth // k)):
            own = owner[:, None] == owner[None]  # [Q, Q]: same start (full attention inside the block)
            new_keys = torch.cat([new_keys, own], dim=1)
            allowed = torch.cat([prefix_ok, new_keys], dim=1)[None, None]  # [1, 1, Q, S + p*Q]
            positions = (t[:, None] + (p - 1) * k + torch.arange(k)[None]).reshape(1, -1)
            tokens = drafted[-1].reshape(1, -1)
            o = model(feats.reshape(1, n * k, -1), model.embed(embed, tokens), positions.to(dev),
                      additive_mask(allowed.to(dev), torch.float32), cache)[0]
            feats = o.reshape(n, k, -1)
            drafted.append(vocab[F.linear(feats.float(), head).argmax(-1)])
        tokens = torch.cat(drafted, dim=1)[:, :depth].cpu()  # [n, depth]
        truth = greedy[t[:, None] + torch.arange(depth)[None]]
        hits[pick] = tokens == truth
    return hits


def evaluate(model, embed, head, vocab, vocab_index, samples: list[dict], cfg: TrainConfig, depth: int = 8,
             max_starts: int = 16) -> dict:
    """Held-out loss (teacher forced, no glancing) and acc@1..depth: the share of rollouts whose first d drafted
    tokens all equal the target's greedy tokens (so the sum over d is the expected accepted chain length)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    losses, chains = [], []
    with torch.no_grad(), autocast(cfg, head.device.type):
        for i in range(0, len(samples), cfg.batch_size):
            batch = make_batch(samples[i : i + cfg.batch_size], model.k, cfg.max_len).to(head.device)
            if batch.valid.any():
                out = forward(model, model.k, embed, batch, batch.features, batch.tokens,
                              torch.zeros(len(batch.tokens), dtype=torch.long))
                losses.append(compute_losses(out, batch, batch.valid, head, vocab_index, cfg))
        for s in samples:
            s = {key: v[: cfg.max_len] for key, v in s.items()}
            starts = rollout_starts(s, model.k, depth)
            if len(starts) > max_starts:
                starts = starts[torch.randperm(len(starts), generator=gen)[:max_starts]].sort().values
            if len(starts):
                chains.append(rollout(model, embed, head, vocab, s, starts, depth).cumprod(1))
    result = {}
    if losses:
        n = sum(x.count for x in losses)
        for name in ("total", "reg", "kl", "ce", "acc"):
            result[f"eval_{name}"] = sum(float(getattr(x, name)) * x.count for x in losses) / n
    if chains:
        acc = torch.cat(chains).float().mean(0)
        result.update({f"acc@{d + 1}": round(float(acc[d]), 4) for d in range(depth)})
        result["rollouts"] = sum(len(c) for c in chains)
    return result


# ----------------------------------------------------------------------------- the loop
def csgd_step(model, embed: torch.Tensor, head: torch.Tensor, vocab_index: torch.Tensor, batch: Batch,
              cfg: TrainConfig, ratio: float, gen: torch.Generator) -> tuple[Losses, dict]:
    """One CSGD forward: noise, pass 1 + glancing (if cfg.glance, k >= 2 and ratio > 0), pass 2 and the losses
    over trained positions minus the glanced ones. Returns the losses (with gradients) and a log record."""
    device = batch.tokens.device  # random draws come from the CPU generator, then move to the batch's device
    offsets = torch.randint(0, cfg.k, (batch.tokens.shape[0],), generator=gen)
    noise = ((torch.rand(batch.features.shape, generator=gen) * 2 - 1) * cfg.feature_noise).to(device)
    features, tokens = batch.features + noise, batch.tokens
    chosen = torch.zeros_like(batch.valid)
    record = {}
    if cfg.glance and cfg.k > 1 and ratio > 0:
        with torch.no_grad():
            out1 = forward(model, cfg.k, embed, batch, features, tokens, offsets)
            guess = F.linear(out1.float(), head).argmax(-1)  # [B, S] draft-vocabulary index
            mismatches = ((guess != draft_index(batch.labels, vocab_index)) & batch.valid).sum(-1)  # [B]
        chosen = choose_glances(batch.valid.cpu(), mismatches.cpu(), offsets, ratio, cfg.k, gen).to(device)
        features, tokens = apply_glances(batch, chosen, features)
        record.update(hamming=int(mismatches.sum()), glanced=int(chosen.sum()), ratio=round(ratio, 4))
    out2 = forward(model, cfg.k, embed, batch, features, tokens, offsets)
    losses = compute_losses(out2, batch, batch.valid & ~chosen, head, vocab_index, cfg)
    return losses, record


def autocast(cfg: TrainConfig, device_type: str = "cpu"):
    if cfg.dtype in ("bfloat16", "bf16"):
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    if cfg.dtype not in ("float32", "fp32"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {cfg.dtype!r}")
    return contextlib.nullcontext()


def forward(model, k: int, embed: torch.Tensor, batch: Batch, features: torch.Tensor, tokens: torch.Tensor,
            block_offset: torch.Tensor) -> torch.Tensor:
    """Drafter outputs [B, S, H] under the relaxed causal mask (one block alignment per sample)."""
    from .drafters.sar_model import relaxed_causal_mask

    B, S = tokens.shape
    mask = relaxed_causal_mask(S, 0, k, block_offset=block_offset.long(), key_padding=batch.key_padding,
                               device=tokens.device)
    positions = torch.arange(S, device=tokens.device)[None].expand(B, S)
    return model(features, F.embedding(tokens, embed), positions, mask)


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min((step - cfg.warmup) / max(cfg.max_steps - cfg.warmup, 1), 1.0)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * progress)) * (cfg.lr - cfg.min_lr)


def batch_indices(n: int, step: int, cfg: TrainConfig, rank: int, world: int) -> list[int]:
    """Sample indices of this process at ``step``: a seeded permutation per epoch, so resuming needs only the step."""
    per_step = cfg.batch_size * world
    steps_per_epoch = max(n // per_step, 1)
    epoch, i = divmod(step, steps_per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 100003 + epoch))
    start = i * per_step + rank * cfg.batch_size
    return [int(perm[(start + j) % n]) for j in range(cfg.batch_size)]


def draft_vocabulary(samples: list[dict], target, cfg: TrainConfig) -> torch.Tensor | None:
    """The ``cfg.draft_vocab`` tokens the target most often produces inside assistant text of the training data,
    plus (if ``cfg.vocab_corpus``) the tokens of the assistant turns of a larger corpus; EOS is always in."""
    from .data import load_conversations, sharegpt_split
    from .drafters.sar_model import most_frequent_tokens

    vocab_size = target.vocab_size
    if cfg.draft_vocab <= 0 or cfg.draft_vocab >= vocab_size:
        return None
    counts = torch.zeros(vocab_size, dtype=torch.long)
    for s in samples:
        produced = s["target_tokens"][:-1].long()[s["loss_mask"][1:].bool()]
        counts += torch.bincount(produced, minlength=vocab_size)
    if cfg.vocab_corpus:
        convs = sharegpt_split(load_conversations(cfg.vocab_corpus, cfg.vocab_corpus_limit), "train")
        texts = [m["content"] for c in convs for m in c.messages if m["role"] == "assistant"]
        for ids in target.tokenizer(texts, add_special_tokens=False)["input_ids"]:
            counts += torch.bincount(torch.tensor(ids, dtype=torch.long), minlength=vocab_size)
    return most_frequent_tokens(counts, cfg.draft_vocab, always=sorted(target.eos_token_ids))


def load_data(cfg: TrainConfig, hidden_size: int) -> tuple[list[dict], list[dict], dict]:
    from .data import ShardDataset

    data = ShardDataset(cfg.data)
    if data.samples[0]["hidden_states"].shape[-1] != hidden_size:
        raise ValueError(f"{cfg.data} holds features of size {data.samples[0]['hidden_states'].shape[-1]}, but "
                         f"target {cfg.model!r} has hidden size {hidden_size}: generate data with this target")
    train_samples = list(data.samples)
    if cfg.eval_data:
        held = ShardDataset(cfg.eval_data)
        if held.meta.get("model") != data.meta.get("model"):
            raise ValueError(f"--eval-data was generated with {held.meta.get('model')!r}, --data with "
                             f"{data.meta.get('model')!r}")
        overlap = set(held.ids) & set(data.ids)
        if overlap:
            raise ValueError(f"--eval-data shares {len(overlap)} conversations with --data (e.g. {min(overlap)!r})")
        eval_samples = list(held.samples[: cfg.eval_samples])
    else:
        if len(train_samples) <= cfg.eval_samples:
            raise ValueError(f"{cfg.data} has {len(train_samples)} samples: too few to hold out --eval-samples "
                             f"{cfg.eval_samples}; pass --eval-data or lower --eval-samples")
        train_samples, eval_samples = train_samples[: -cfg.eval_samples], train_samples[-cfg.eval_samples:]
    return train_samples, eval_samples, data.meta


def save_checkpoint(directory: Path, model, state: dict) -> None:
    """Drafter files + state.pt, swapped in atomically (a crash mid-save keeps the previous checkpoint)."""
    tmp = directory.with_name(directory.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    torch.save(state, tmp / "state.pt")
    old = directory.with_name(directory.name + ".old")
    if directory.exists():
        os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
        shutil.rmtree(old)


def resolve_init_from(cfg: TrainConfig) -> str:
    """--init-from as a directory: ``falcon``/``eagle``/``medusa`` name the drafters shipped for a built-in model."""
    from .drafters import SHIPPED_KINDS, shipped_drafter_dir

    return str(shipped_drafter_dir(cfg.model, cfg.init_from)) if cfg.init_from in SHIPPED_KINDS else cfg.init_from


def init_drafter(cfg: TrainConfig, target, train_samples: list[dict], ckpt: Path):
    """The drafter and trainer state to start from: the checkpoint if there is one, else a fresh drafter."""
    from .drafters.sar_model import SARDrafterModel

    if (ckpt / "state.pt").exists():
        model = SARDrafterModel.from_pretrained(ckpt, target)
        if (model.config.k, model.config.num_layers) != (cfg.k, cfg.num_layers):
            raise ValueError(f"{ckpt} holds a drafter with k={model.config.k}, num_layers={model.config.num_layers}: "
                             "resume with the same settings or use a new --out")
        return model, torch.load(ckpt / "state.pt", weights_only=False)
    if cfg.init_from:
        model = SARDrafterModel.from_pretrained(resolve_init_from(cfg), target)
        if (model.config.k, model.config.num_layers) != (cfg.k, cfg.num_layers):
            raise ValueError(f"--init-from {cfg.init_from} holds a drafter with k={model.config.k}, num_layers="
                             f"{model.config.num_layers}: pass --k {model.config.k} --num-layers "
                             f"{model.config.num_layers}")
        return model, None
    vocab_ids = draft_vocabulary(train_samples, target, cfg)
    torch.manual_seed(cfg.seed)
    model = SARDrafterModel.for_target(target, k=cfg.k, num_layers=cfg.num_layers, draft_vocab=vocab_ids)
    if cfg.init_from_target:
        for mine, theirs in zip(model.layers, target.decoder.layers[-cfg.num_layers:]):
            mine.load_state_dict(theirs.state_dict())
    return model, None


def train(cfg: TrainConfig) -> Path | None:
    """Train (or resume) a drafter; returns the final drafter directory (on the main process)."""
    from accelerate import Accelerator

    if cfg.kind not in ("sar", "medusa"):
        raise ValueError(f"--kind must be sar or medusa, got {cfg.kind!r}")
    if cfg.kind == "medusa":
        from .train_medusa import train_medusa

        return train_medusa(cfg)

    from .models import load_target

    acc = Accelerator(cpu=not torch.cuda.is_available())
    out, world, rank = Path(cfg.out), acc.num_processes, acc.process_index
    target = load_target(cfg.model, device=acc.device)
    train_samples, eval_samples, data_meta = load_data(cfg, target.hidden_size)
    embed = target.model.get_input_embeddings().weight.detach()  # [V, H], frozen
    lm_head = target.lm_head.weight.detach()  # [V, H], frozen
    ckpt = out / "checkpoint"
    model, state = init_drafter(cfg, target, train_samples, ckpt)
    model.train()
    head = model.head_weight(lm_head).float()  # [D, H]
    vocab = model.draft_vocab if model.draft_vocab is not None else torch.arange(target.vocab_size)
    vocab_index = torch.full((target.vocab_size,), -1, dtype=torch.long)
    vocab_index[vocab.cpu()] = torch.arange(len(vocab))
    vocab_index = vocab_index.to(acc.device)
    del target
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=cfg.weight_decay)
    step = 0
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        step = state["step"]
    model, optimizer = acc.prepare(model, optimizer)
    raw = acc.unwrap_model(model)
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        log.info("training %d-layer k=%d drafter (%.2fM params, draft vocab %d) on %d samples, eval on %d, "
                 "%d process(es)",
                 cfg.num_layers, cfg.k, raw.num_parameters() / 1e6, len(vocab), len(train_samples), len(eval_samples),
                 world)
    history = state["history"] if state else []
    sessions = (state.get("sessions", []) if state else []) + [
        {"start_step": step, "command": " ".join(["falconspec"] + sys.argv[1:]), "data": cfg.data,
         "train_samples": len(train_samples), "max_steps": cfg.max_steps}]
    t0, tokens_seen = time.time(), 0
    while step < cfg.max_steps:
        # ---- schedule, batch, noise
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step * world + rank)
        batch = make_batch([train_samples[i] for i in batch_indices(len(train_samples), step, cfg, rank, world)],
                           cfg.k, cfg.max_len).to(acc.device)
        with autocast(cfg, acc.device.type):
            losses, record = csgd_step(model, embed, head, vocab_index, batch, cfg, glance_ratio(step, cfg), gen)
        record.update(step=step + 1, lr=lr)
        acc.backward(losses.total)
        if cfg.grad_clip > 0:
            record["grad_norm"] = float(acc.clip_grad_norm_(model.parameters(), cfg.grad_clip))
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        tokens_seen += int(batch.key_padding.sum())
        # ---- log, evaluate, checkpoint
        if acc.is_main_process and (step % cfg.log_every == 0 or step == 1):
            record.update({n: round(float(getattr(losses, n).detach()), 4) for n in ("total", "reg", "kl", "ce",
                                                                                      "acc")},
                          positions=losses.count, tok_per_s=round(tokens_seen / (time.time() - t0), 1))
            _log(out, record)
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            if acc.is_main_process:
                raw.eval()
                result = {"step": step, **evaluate(raw, embed, head, vocab, vocab_index, eval_samples, cfg)}
                raw.train()
                history.append(result)
                _log(out, {"eval": result})
            acc.wait_for_everyone()
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            if acc.is_main_process:
                save_checkpoint(ckpt, raw, {"optimizer": optimizer.state_dict(), "step": step, "history": history,
                                            "sessions": sessions, "config": asdict(cfg)})
            acc.wait_for_everyone()
    final = None
    if acc.is_main_process:
        final = out / "drafter"
        raw.save_pretrained(final)
        recipe = {"command": " ".join(["falconspec"] + sys.argv[1:]), "config": asdict(cfg), "data": data_meta,
                  "data_slice": describe_slice(data_meta), "seed": cfg.seed, "train_samples": len(train_samples),
                  "eval_samples": len(eval_samples), "processes": world, "parameters": raw.num_parameters(),
                  "sessions": sessions, "history": history, "final": history[-1] if history else {}}
        (final / "recipe.json").write_text(json.dumps(recipe, indent=1) + "\n")
    acc.wait_for_everyone()
    acc.end_training()
    return final


def describe_slice(meta: dict) -> str:
    """Which conversations a gen-data directory holds, in words (for recipe.json)."""
    split = {"all": "all conversations", "train": "the train split", "heldout": "the held-out split"}[meta["split"]]
    first = f"the first {meta['num_conversations']}" if meta.get("limit") else "all"
    return (f"{first} conversations opening with a user turn, from {split} (falconspec.data.is_heldout, "
            f"{meta['heldout_percent']}%) of {meta['source']!r} in file order; {meta['mode']} answers; "
            f"cut to {meta['max_len']} tokens")


def _log(out: Path, record: dict) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    log.info("%s", json.dumps(record))
