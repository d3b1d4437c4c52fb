"""Coupled Sequential Glancing Distillation (CSGD): train a SAR drafter on gen-data shards (nanoGPT-shaped).

One step: (1) pass 1 without gradients; (2) Hamming distance d between the drafter's and the target's greedy tokens
over trained positions, per sample; (3) glance N = floor(lambda * d) positions (lambda decays over training): their
inputs become the ground truth of position j+k, and their own losses are dropped; (4) pass 2 with gradients;
(5) SmoothL1 feature regression + distillation (KL(target || drafter) and CE to the target's greedy token, both on
the draft vocabulary); AdamW, warmup + cosine decay, gradient-norm clipping. ``glance=False`` is plain token-shift
training; ``k=1`` trains an EAGLE-style head (glancing needs k >= 2 and is skipped). A drafter whose slots all draft
from the newest position (``newest_slots``) trains by teacher forcing instead, every slot at every position of one
causal pass (:func:`newest_slots_losses`).

:class:`SARObjective` is this objective in the one training loop (:mod:`.trainer`, which also describes the run
directory); :func:`train` runs any gen-data objective (``falconspec train --kind sar|medusa``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .train_common import (
    ShardObjective, TrainConfig, autocast, chain_accuracy, distillation_losses, draft_index, draft_vocabulary,
    rollout_starts, weighted_mean,
)
from .trainer import Objective, Progress, StepResult

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- batches
class Rows:
    """A dataclass of tensors whose first dimension is the sequence."""

    def repeat_each(self, times: int):
        """Every sequence ``times`` times in a row (sequence i becomes rows i * times ... i * times + times - 1); a
        tensor two fields share stays shared."""
        repeated: dict[int, torch.Tensor] = {}
        for value in self.__dict__.values():
            if id(value) not in repeated:
                repeated[id(value)] = value.repeat_interleave(times, dim=0)
        return type(self)(**{name: repeated[id(value)] for name, value in self.__dict__.items()})


@dataclass
class Batch(Rows):
    """A right-padded batch of S = L_max - 1 drafter positions. Position j pairs feature h_j with token x_{j+1} and
    regresses h_{j+k}, whose greedy token (the target's prediction of x_{j+k+1}) is the label."""
    features: torch.Tensor  # [B, S, F] input features h_j (F = H, or the fused layers' inputs: H per layer)
    tokens: torch.Tensor  # [B, S] input tokens x_{j+1}
    target_features: torch.Tensor  # [B, S, H] h_{j+k} (zero past the end)
    labels: torch.Tensor  # [B, S] the target's greedy token at j+k (-1 past the end)
    valid: torch.Tensor  # [B, S] bool: trained on (x_{j+k+1} is an assistant token)
    key_padding: torch.Tensor  # [B, S] bool: real position
    next_features: torch.Tensor  # [B, S, F] the clean ground-truth input of position j+k (F = H: target_features)
    next_tokens: torch.Tensor  # [B, S] x_{j+k+1}, the ground-truth input token of position j+k

    def __len__(self) -> int:
        return self.tokens.shape[0]

    def to(self, device) -> Batch:
        return Batch(**{name: value.to(device) for name, value in self.__dict__.items()})


@dataclass
class Padded(Rows):
    """Gen-data samples (see :class:`falconspec.data.ShardDataset`) right-padded to one width L: what every batch
    layout is cut from (:func:`regressing`)."""
    hidden: torch.Tensor  # [B, L, H] the target's features h_0 .. h_{L-1}
    inputs: torch.Tensor  # [B, L, F] the drafter's input features: ``hidden`` itself, or the fused layers' inputs
    ids: torch.Tensor  # [B, L] token ids (0 past the end)
    loss_mask: torch.Tensor  # [B, L] bool: an answer token
    greedy: torch.Tensor  # [B, L] the target's greedy token after each position (-1 past the end)
    lengths: torch.Tensor  # [B]

    def __len__(self) -> int:
        return self.ids.shape[0]


def pad_samples(samples: list[dict], max_len: int) -> Padded:
    """Cut gen-data samples to ``max_len`` tokens and right-pad them to the longest."""
    samples = [{key: v[:max_len] for key, v in s.items()} for s in samples]
    width = max(len(s["input_ids"]) for s in samples)

    def pad(key: str, shape: tuple, fill, dtype) -> torch.Tensor:
        out = torch.full((len(samples), *shape), fill, dtype=dtype)
        for i, s in enumerate(samples):
            out[i, : len(s[key])] = s[key].to(dtype)
        return out

    def features(key: str) -> torch.Tensor:
        return pad(key, (width, samples[0][key].shape[-1]), 0.0, torch.float32)

    hidden = features("hidden_states")
    inputs = features("layer_inputs") if "layer_inputs" in samples[0] else hidden
    return Padded(hidden=hidden, inputs=inputs,
                  ids=pad("input_ids", (width,), 0, torch.long), loss_mask=pad("loss_mask", (width,), 0, torch.bool),
                  greedy=pad("target_tokens", (width,), -1, torch.long),
                  lengths=torch.tensor([len(s["input_ids"]) for s in samples]))


def regressing(padded: Padded, ahead: int | torch.Tensor) -> Batch:
    """The batch whose position j regresses h_{j+a}, a = ``ahead``: one distance (a drafter with block size a), or
    one per position [B, S]."""
    (B, width), S = padded.ids.shape, padded.ids.shape[1] - 1
    j = torch.arange(S)
    regressed = (j + torch.as_tensor(ahead)).expand(B, S)  # position whose feature position j regresses
    in_range = (regressed + 1) < padded.lengths[:, None]  # x_{j+a+1} exists
    take, rows = regressed.clamp(max=width - 1), torch.arange(B)[:, None]
    after = (take + 1).clamp(max=width - 1)
    target_features = torch.where(in_range[..., None], padded.hidden[rows, take], 0.0)
    next_features = target_features if padded.inputs is padded.hidden else torch.where(
        in_range[..., None], padded.inputs[rows, take], 0.0)
    return Batch(
        features=padded.inputs[:, :S], tokens=padded.ids[:, 1:], target_features=target_features,
        labels=torch.where(in_range, padded.greedy[rows, take], -1),
        valid=in_range & padded.loss_mask[rows, after], key_padding=j[None] < (padded.lengths[:, None] - 1),
        next_features=next_features, next_tokens=torch.where(in_range, padded.ids[rows, after], 0),
    )


def make_batch(samples: list[dict], k: int, max_len: int) -> Batch:
    """Collate gen-data samples (see :class:`falconspec.data.ShardDataset`) for a drafter with block size k."""
    return regressing(pad_samples(samples, max_len), k)


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
    from .drafters.sar_model import block_slots

    eligible = valid & (block_slots(valid.shape[1], k, block_offset, valid.device) == 0)
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


def compute_losses(outputs: torch.Tensor, batch: Batch, valid: torch.Tensor, head: torch.Tensor,
                   vocab_index: torch.Tensor, cfg: TrainConfig, block_offset: torch.Tensor | None = None) -> Losses:
    """SmoothL1(o_j, h_{j+k}) + dist_weight * (kl_weight * KL(target || drafter) + (1 - kl_weight) * CE(greedy)),
    averaged over the ``valid`` [B, S] positions, slot s of a block (blocks aligned by ``block_offset`` [B]) weighing
    ``cfg.later_slot_weight ** s``. Both distributions live on the draft vocabulary (``head`` [D, H])."""
    if not valid.any():  # nothing to learn here (keeps the graph, so distributed backward still syncs)
        zero = outputs.sum() * 0
        return Losses(zero, zero, zero, zero, zero.detach(), 0)
    pred = outputs[valid].float()  # [n, H]
    true = batch.target_features[valid]
    weights = None
    if cfg.later_slot_weight != 1.0 and block_offset is not None:
        from .drafters.sar_model import block_slots

        slot = block_slots(valid.shape[1], cfg.k, block_offset, valid.device)
        weights = cfg.later_slot_weight ** slot[valid].float()
    reg = weighted_mean(F.smooth_l1_loss(pred, true, reduction="none").mean(-1), weights)
    label = draft_index(batch.labels[valid], vocab_index)
    kl, ce, draft_logp = distillation_losses(F.linear(pred, head) / cfg.temperature,
                                             F.linear(true, head) / cfg.temperature, label, weights,
                                             cfg.distill_topk)
    dist = cfg.kl_weight * kl + (1 - cfg.kl_weight) * ce
    acc = (draft_logp.argmax(-1) == label).float().mean()
    return Losses(cfg.reg_weight * reg + cfg.dist_weight * dist, reg, kl, ce, acc, int(valid.sum()))


# ----------------------------------------------------------------------------- held-out rollout accuracy
@torch.no_grad()
def rollout(model, embed: torch.Tensor, head: torch.Tensor, vocab: torch.Tensor, sample: dict, starts: torch.Tensor,
            depth: int) -> torch.Tensor:
    """Draft ``depth`` tokens after each start t the way the drafter runs at inference: one pass over the prefix
    (the last k outputs form one block ending at t-1; ``slot_outputs`` says which of them draft its slots), then
    passes that feed back the drafter's own k predicted features and tokens as a new block. All starts share one
    prefix pass per block alignment. Returns [n, depth] bool: drafted token == the target's greedy token."""
    from .drafters.sar_model import additive_mask, attention_block, relaxed_causal_mask, slot_outputs

    k, S, dev = model.k, len(sample["input_ids"]) - 1, head.device  # index bookkeeping stays on the CPU
    block = attention_block(model)  # k, or 1: causal, every slot drafted from the newest position
    h = sample.get("layer_inputs", sample["hidden_states"]).float()[None, :S].to(dev)  # [1, S, F] input features
    ids = sample["input_ids"].long()
    greedy = sample["target_tokens"].long()
    hits = torch.zeros(len(starts), depth, dtype=torch.bool)
    for offset in range(block):
        pick = ((starts + offset) % block == 0).nonzero().flatten()
        if len(pick) == 0:
            continue
        t, n = starts[pick], len(pick)
        cache = model.new_cache()
        mask = relaxed_causal_mask(S, 0, block, block_offset=offset, device=dev)
        out = model(h, model.embed(embed, ids[None, 1 : S + 1]), torch.arange(S, device=dev)[None], mask, cache,
                    block_offset=offset)[0]
        whole_blocks = torch.zeros(n, dtype=torch.long, device=dev)  # rows of k outputs, each one whole block
        last_block = slot_outputs(model, out[t[:, None] - k + torch.arange(k)[None]])
        prefix_ok = torch.arange(S)[None] < t.repeat_interleave(k)[:, None]  # [Q, S]
        feats, first = drafted_view(model, embed, head, vocab, last_block, whole_blocks,
                                    chain_reads(model, cache, prefix_ok[k - 1 :: k], t - 1, dev))
        drafted = [first]  # [n, k] target ids; feats [n, k, H]: predicted h_t .. h_{t+k-1}
        owner = torch.arange(n).repeat_interleave(k)  # start of each query in a feedback block
        new_keys = torch.zeros(n * k, 0, dtype=torch.bool)
        query = torch.arange(n * k)
        for p in range(1, -(-depth // k)):
            own = owner[:, None] == owner[None]  # [Q, Q]: same start (full attention inside the block)
            if block == 1:  # causal inside it
                own &= query[:, None] >= query[None]
            new_keys = torch.cat([new_keys, own], dim=1)
            allowed = torch.cat([prefix_ok, new_keys], dim=1)[None, None]  # [1, 1, Q, S + p*Q]
            positions = (t[:, None] + (p - 1) * k + torch.arange(k)[None]).reshape(1, -1)
            tokens = drafted[-1].reshape(1, -1)
            o = model(feats.reshape(1, n * k, -1), model.embed(embed, tokens), positions.to(dev),
                      additive_mask(allowed.to(dev), torch.float32), cache, block_offset=0)[0]
            reads = chain_reads(model, cache, allowed[0, 0, k - 1 :: k], positions[0, k - 1 :: k], dev)
            feats, block_tokens = drafted_view(model, embed, head, vocab, slot_outputs(model, o.reshape(n, k, -1)),
                                               whole_blocks, reads)
            drafted.append(block_tokens)
        tokens = torch.cat(drafted, dim=1)[:, :depth].cpu()  # [n, depth]
        truth = greedy[t[:, None] + torch.arange(depth)[None]]
        hits[pick] = tokens == truth
    return hits


def scored_windows(sample: dict, k: int, depth: int, opening: int, keys: torch.Tensor, max_starts: int) -> torch.Tensor:
    """The starts of the windows of ``sample`` that :func:`evaluate` scores: its valid ones
    (:func:`.train_common.rollout_starts`), or the ``max_starts`` of them with the highest ``keys`` (one per
    position), in order."""
    starts = rollout_starts(sample, k, depth, opening)
    if len(starts) > max_starts:
        starts = starts[keys[starts].topk(max_starts).indices].sort().values
    return starts


def evaluate(model, embed, head, vocab, vocab_index, samples: list[dict], cfg: TrainConfig, depth: int = 8,
             max_starts: int = 16) -> dict:
    """Held-out loss (teacher forced, no glancing) and acc@1..depth: the share of rollouts whose first d drafted
    tokens all equal the target's greedy tokens (so the sum over d is the expected accepted chain length).

    A sample with more than ``max_starts`` windows is scored on ``max_starts`` of them, the same ones for every
    drafter: each position of a sample draws a fixed random key (seed ``--eval-window-seed``, not the run's
    ``--seed``) and the windows with the highest keys are kept, whatever the drafter's k, so drafters are compared on
    the same text."""
    gen = torch.Generator().manual_seed(cfg.eval_window_seed)
    losses, chains, slot_losses = [], [], []
    with torch.no_grad(), autocast(cfg, head.device.type):
        for i in range(0, len(samples), cfg.batch_size):
            total, slots, _ = layout_losses(model, embed, head, vocab_index, samples[i : i + cfg.batch_size], cfg)
            if total.count:
                losses.append(total)
                slot_losses.append(slots)
        for s in samples:
            s = {key: v[: cfg.max_len] for key, v in s.items()}
            keys = torch.rand(len(s["input_ids"]), generator=gen)  # drawn for every sample, in order
            starts = scored_windows(s, model.k, depth, cfg.eval_answer_opening, keys, max_starts)
            if len(starts):
                chains.append(rollout(model, embed, head, vocab, s, starts, depth).cumprod(1))
    result = {}
    if losses:
        n = sum(x.count for x in losses)
        for name in ("total", "reg", "kl", "ce", "acc"):
            result[f"eval_{name}"] = sum(float(getattr(x, name)) * x.count for x in losses) / n
    if any(slot_losses):  # teacher forced: slot i right given the true tokens before it
        counts = [sum(slots[i].count for slots in slot_losses) for i in range(model.k)]  # (slot 1: ~P(d2 | d1))
        result["slot_acc"] = [round(sum(float(slots[i].acc) * slots[i].count for slots in slot_losses)
                                    / max(counts[i], 1), 4) for i in range(model.k)]
    result.update(chain_accuracy(chains))
    return result


# ----------------------------------------------------------------------------- training-time test
def unroll_blocks(model, embed: torch.Tensor, head: torch.Tensor, vocab: torch.Tensor, batch: Batch,
                  outputs: torch.Tensor, cache, block_offset: torch.Tensor, origin_ok: torch.Tensor,
                  blocks: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Training-time test over SAR blocks: ``blocks`` further passes after the teacher-forced one (``outputs``
    [B, S, H], whose keys ``cache`` holds), each a copy of the sequence in which position p holds the drafter's own
    prediction from the pass before: the feature predicted at p - k and its greedy token (draft vocabulary ``vocab``
    -> target ids). A query of block b in pass s attends as the s-th drafting pass after a prefix ending with block
    b - s does: the teacher-forced keys of blocks <= b - s, and pass j's keys of block b - s + j (its own block
    when j = s). ``outputs`` are the pass's own, before any chaining (``chain_slots``): every pass's later slots
    are chained with the tokens drafted at the slots before them, as drafting does (:func:`drafted_view`).
    Returns per pass (outputs [B, S, H], chained so, ok [B, S]: the chain is real, starts at or after the first
    position from a whole ``origin_ok`` block of the teacher-forced pass). Inputs are detached: each pass learns
    to draft from the features it is given, as EAGLE-3's training-time test does."""
    from .drafters.sar_model import additive_mask, block_index, block_slots

    k, (B, S), dev = model.k, batch.tokens.shape, batch.tokens.device
    pos = torch.arange(S, device=dev)
    block = block_index(S, k, block_offset, dev)  # [B, S]
    whole = pos[None] >= block_slots(S, k, block_offset, dev)  # the block starts inside the sequence
    source, has_source = (pos - k).clamp(min=0), pos >= k
    ok, keys_ok, passes = origin_ok & whole & batch.key_padding, [batch.key_padding], []
    prev, prev_tokens = (x.detach() for x in drafted_view(model, embed, head, vocab, outputs, block_offset))
    for s in range(1, blocks + 1):
        feats = prev[:, source] * has_source[None, :, None]
        tokens = prev_tokens[:, source]  # [B, S] target ids
        ok = ok[:, source] & has_source[None] & batch.key_padding
        keys_ok.append(ok)
        parts = [block[:, None, :] <= (block - s)[:, :, None]]  # teacher-forced keys: blocks <= b - s
        parts += [block[:, None, :] == (block - s + j)[:, :, None] for j in range(1, s + 1)]
        allowed = torch.cat(parts, dim=-1) & torch.cat(keys_ok, dim=-1)[:, None, :]  # [B, S, (s+1)S]
        out = model(feats, model.embed(embed, tokens), pos[None].expand(B, S), additive_mask(allowed[:, None],
                    torch.float32), cache, block_offset=block_offset.long(), lengths=batch.key_padding.sum(-1))
        out, out_tokens = drafted_view(model, embed, head, vocab, out, block_offset)
        passes.append((out, ok))
        prev, prev_tokens = out.detach(), out_tokens
    return passes


def chain_reads(model, cache, sees: torch.Tensor, newest: torch.Tensor, device):
    """What the later slots of whole blocks read when the drafter's chain attends (``chain_attention``; else None):
    ``cache``'s last-layer keys and values, where each block's newest position ``newest`` [n] sees ``sees`` [n, T']
    (the first T' cached positions); its slot i sits at position ``newest`` + i."""
    from .drafters.sar_model import ChainReads

    if model.chain_attention is None:
        return None
    return ChainReads.from_cache(cache, sees, newest, 0, model.k, device)


def drafted_view(model, embed: torch.Tensor, head: torch.Tensor, vocab: torch.Tensor, outputs: torch.Tensor,
                 block_offset: torch.Tensor, reads=None) -> tuple[torch.Tensor, torch.Tensor]:
    """What drafting reads of a pass's outputs [B, S, H] (blocks aligned by ``block_offset`` [B]): per position the
    feature and its greedy token (target ids [B, S]). Without ``chain_slots`` the outputs themselves; with it, slot
    i > 0 of a block is first conditioned on the token drafted at slot i - 1, one position earlier, and that
    conditioned output is the feature the next block reads. Rows of one whole block each (:func:`rollout`) pass
    ``block_offset`` 0. A block cut by the sequence start reads a wrapped-around token there: :func:`unroll_blocks`
    starts no chain from such a block. ``reads``: what a chain that attends reads (:class:`.sar_model.ChainReads`,
    for whole blocks)."""
    tokens = vocab[F.linear(outputs.float(), head).argmax(-1)]
    if model.chain is None:
        return outputs, tokens
    from .drafters.sar_model import block_slots

    slots = block_slots(outputs.shape[1], model.k, block_offset, outputs.device)  # [B, S]
    feats = outputs
    for slot in range(1, model.k):  # slot i reads slot i - 1's token, final once slot i - 1 is done
        here = slots == slot
        chained = model.chained(outputs, model.embed(embed, tokens.roll(1, dims=1)), reads)
        feats = torch.where(here[..., None], chained, feats)
        tokens = torch.where(here, vocab[F.linear(feats.float(), head).argmax(-1)], tokens)
    return feats, tokens


def blocks_with(chosen: torch.Tensor, block_offset: torch.Tensor, k: int) -> torch.Tensor:
    """[B, S] bool: the position's block holds a ``chosen`` [B, S] position."""
    from .drafters.sar_model import block_index

    block = block_index(chosen.shape[1], k, block_offset, chosen.device)
    return ((block[:, :, None] == block[:, None, :]) & chosen[:, None, :]).any(-1)


# ----------------------------------------------------------------------------- the loop
def csgd_step(model, embed: torch.Tensor, head: torch.Tensor, vocab_index: torch.Tensor, batch: Batch,
              cfg: TrainConfig, ratio: float, gen: torch.Generator,
              vocab: torch.Tensor | None = None) -> tuple[Losses, dict]:
    """One CSGD forward: noise, pass 1 + glancing (if cfg.glance, k >= 2 and ratio > 0), pass 2 and the losses
    over trained positions minus the glanced ones; with ``cfg.ttt_blocks``, the unrolled passes' losses too
    (:func:`unroll_blocks`, chains from blocks without glanced inputs, weighted ``cfg.ttt_weight ** s``; ``vocab``:
    draft index -> target id). Returns the losses (with gradients) and a log record."""
    device = batch.tokens.device  # random draws come from the CPU generator, then move to the batch's device
    batch, offsets = block_alignments(batch, cfg, gen)
    features, tokens = noised(batch.features, cfg, gen), batch.tokens
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
    if cfg.ttt_blocks and vocab is None:
        raise ValueError("training-time test (ttt_blocks) needs the draft vocabulary's target ids: pass vocab")
    cache = model.new_cache() if cfg.ttt_blocks else None
    raw = forward(model, cfg.k, embed, batch, features, tokens, offsets, cache, chain=not cfg.ttt_blocks)
    out2 = model.chain_teacher_forced(raw, F.embedding(batch.tokens, embed), offsets) if cfg.ttt_blocks else raw
    losses = compute_losses(out2, batch, batch.valid & ~chosen, head, vocab_index, cfg, offsets)
    if cfg.ttt_blocks:
        unrolled = unroll_blocks(model, embed, head, vocab, batch, raw, cache, offsets,
                                 ~blocks_with(chosen, offsets, cfg.k), cfg.ttt_blocks)
        total, accs = losses.total, []
        for s, (out, ok) in enumerate(unrolled, start=1):
            extra = compute_losses(out, batch, batch.valid & ok, head, vocab_index, cfg, offsets)
            total, accs = total + cfg.ttt_weight ** s * extra.total, accs + [round(float(extra.acc), 4)]
        losses = Losses(total, losses.reg, losses.kl, losses.ce, losses.acc, losses.count)
        record["ttt_acc"] = accs
    return losses, record


def slot_batches(samples: list[dict], k: int, max_len: int) -> list[Batch]:
    """The batches of a drafter whose slots all draft from the newest position (``newest_slots``), one per slot:
    slot i of position j regresses h_{j+i+1} (:func:`make_batch` with block size i + 1; same inputs in all)."""
    padded = pad_samples(samples, max_len)
    return [regressing(padded, slot + 1) for slot in range(k)]


def newest_slots_losses(model, embed: torch.Tensor, head: torch.Tensor, vocab_index: torch.Tensor,
                        batches: list[Batch], cfg: TrainConfig, features: torch.Tensor) -> tuple[Losses, list[Losses]]:
    """Teacher-forced losses of a drafter whose slots all draft from the newest position (``newest_slots``; plain
    token-shift training, as the head's): one causal pass over ``features`` [B, S, H] (the inputs, noised or not)
    gives o_j, slot 0, regressing h_{j+1}; slot i is o_j through the chain on the true token x_{j+i+1} (slot
    i - 1's) and regresses h_{j+i+1} (``batches`` from :func:`slot_batches`). Every position trains every slot; slot
    i weighs ``cfg.later_slot_weight ** i``; with ``cfg.detach_chain`` only slot 0's loss reaches the decoder.
    Returns the weighted total (reg, kl, ce, acc and count: slot 0's) and each slot's losses."""
    from .drafters.sar_model import relaxed_causal_mask

    first = batches[0]
    B, S = first.tokens.shape
    mask = relaxed_causal_mask(S, 0, 1, key_padding=first.key_padding, device=first.tokens.device)
    positions = torch.arange(S, device=first.tokens.device)[None].expand(B, S)
    embeds = F.embedding(first.tokens, embed)
    out = model(features, embeds, positions, mask, chain_embeds=embeds,
                detach_chain=cfg.detach_chain)  # [B, S, k, H]
    slots = [compute_losses(out[:, :, slot], batch, batch.valid, head, vocab_index, cfg)
             for slot, batch in enumerate(batches)]
    total = sum(cfg.later_slot_weight ** slot * losses.total for slot, losses in enumerate(slots))
    head_slot = slots[0]
    return Losses(total, head_slot.reg, head_slot.kl, head_slot.ce, head_slot.acc, head_slot.count), slots


def reversed_slots_batch(samples: list[dict], cfg: TrainConfig,
                         gen: torch.Generator | None = None) -> tuple[Batch, torch.Tensor]:
    """The batch and block alignments [B] of a step of a drafter that drafts its blocks' slots in reverse
    (``reversed_slots``): alignments as :func:`block_alignments` chooses them (without ``gen``: blocks from position
    0), then position j drafting slot s regresses h_{j+2s+1} (:func:`.sar_model.regress_ahead`: one distance per
    position, :func:`regressing`)."""
    from .drafters.sar_model import regress_ahead

    padded = pad_samples(samples, cfg.max_len)
    if gen is None:
        offsets = torch.zeros(len(samples), dtype=torch.long)
    else:
        padded, offsets = block_alignments(padded, cfg, gen)
    return regressing(padded, regress_ahead(cfg, padded.ids.shape[1] - 1, offsets)), offsets


def layout_losses(model, embed: torch.Tensor, head: torch.Tensor, vocab_index: torch.Tensor, samples: list[dict],
                  cfg: TrainConfig, gen: torch.Generator | None = None) -> tuple[Losses, list[Losses], int]:
    """Token-shift losses (no glancing) of one batch of ``samples`` in the drafter's own block layout, and the
    number of positions in the batch. Layouts: blocks whose slots all draft from the newest position
    (:func:`newest_slots_losses`; then also each slot's losses, else none), from their positions in reverse
    (:func:`reversed_slots_batch`), or the paper's block (evaluation only: its training step is :func:`csgd_step`).
    With ``gen``, a training step's: noised inputs and random block alignments; without, evaluation's: clean
    inputs, blocks from position 0."""
    config = model.config
    if config.newest_slots:
        batches = [b.to(head.device) for b in slot_batches(samples, model.k, cfg.max_len)]
        features = batches[0].features if gen is None else noised(batches[0].features, cfg, gen)
        return (*newest_slots_losses(model, embed, head, vocab_index, batches, cfg, features),
                int(batches[0].key_padding.sum()))
    if config.reversed_slots:
        batch, offsets = reversed_slots_batch(samples, cfg, gen)
    else:
        batch, offsets = make_batch(samples, model.k, cfg.max_len), torch.zeros(len(samples), dtype=torch.long)
    batch = batch.to(head.device)
    features = batch.features if gen is None else noised(batch.features, cfg, gen)
    out = forward(model, model.k, embed, batch, features, batch.tokens, offsets)
    return compute_losses(out, batch, batch.valid, head, vocab_index, cfg), [], int(batch.key_padding.sum())


def noised(features: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> torch.Tensor:
    """Training inputs: ``features`` plus uniform noise U(-x, x), x = ``cfg.feature_noise``, drawn from the CPU
    generator ``gen`` and moved to the features' device."""
    noise = (torch.rand(features.shape, generator=gen) * 2 - 1) * cfg.feature_noise
    return features + noise.to(features.device)


def block_alignments(batch: Batch | Padded, cfg: TrainConfig,
                     gen: torch.Generator) -> tuple[Batch | Padded, torch.Tensor]:
    """The batch a CSGD step trains on and its block alignments [B] (block starts at position offset mod k): one
    random alignment per sequence, or with ``cfg.every_alignment`` every sequence k times, once per alignment, so
    that each position is trained once in every slot of a block (the first slot, the drafter's depth-1 token,
    included) at k times the cost."""
    if cfg.every_alignment:  # TrainConfig refuses it with k = 1
        batch = batch.repeat_each(cfg.k)
        return batch, torch.arange(len(batch)) % cfg.k
    return batch, torch.randint(0, cfg.k, (len(batch),), generator=gen)


def forward(model, k: int, embed: torch.Tensor, batch: Batch, features: torch.Tensor, tokens: torch.Tensor,
            block_offset: torch.Tensor, cache=None, chain: bool = True) -> torch.Tensor:
    """Drafter outputs [B, S, H] under the relaxed causal mask (one block alignment per sample), later block slots
    conditioned on the true token of the slot before (``chain_slots``: the batch's own tokens, never glanced ones;
    ``chain=False``: not yet, the caller chains them); ``cache`` (a drafter KV cache) keeps the keys for
    :func:`unroll_blocks`."""
    from .drafters.sar_model import relaxed_causal_mask

    B, S = tokens.shape
    mask = relaxed_causal_mask(S, 0, k, block_offset=block_offset.long(), key_padding=batch.key_padding,
                               device=tokens.device)
    positions = torch.arange(S, device=tokens.device)[None].expand(B, S)
    embeds = F.embedding(tokens, embed)
    true_embeds = embeds if tokens is batch.tokens else F.embedding(batch.tokens, embed)  # glanced inputs differ
    return model(features, embeds, positions, mask, cache, block_offset=block_offset.long(),
                 lengths=batch.key_padding.sum(-1), chain_embeds=true_embeds if chain else None)


class SARObjective(ShardObjective, Objective):
    """CSGD for a SAR drafter (``falconspec train --kind sar``; ``--k 2``: Falcon, ``--k 1``: EAGLE-style head),
    on gen-data shards, in one or several processes."""

    name = "sar"
    accelerated = True

    def load(self, directory, target):
        from .drafters.sar_model import SARDrafterModel

        return SARDrafterModel.from_pretrained(directory, target)

    def adapt(self, model, why: str):
        """An ``--init-from`` drafter grows the parts the settings add (they start at zero, so it drafts as before
        until trained); a resumed one must already match."""
        cfg = self.config
        if why != "init_from":
            return model
        layers, last = self.feature_layers, self.num_target_layers
        if layers and model.feature_layers is None and max(layers) == last:  # the last layer stays, the rest start at 0
            model = model.with_feature_layers(layers, last)
        if model.config.num_layers < cfg.num_layers:  # appended layers start as identities
            model = model.with_layers(cfg.num_layers)
        if cfg.newest_slots and model.k == 1 < cfg.k:  # a head: its decoder drafts slot 0
            return model.with_newest_slots(cfg.k, cfg.chain_attention)
        if model.k < 2:
            return model
        return model.grown(newest_pair=cfg.newest_pair, chain_slots=cfg.chain_slots)

    def check(self, model, why: str, source) -> None:
        cfg = self.config
        mine = model.config
        layers = self.feature_layers
        if mine.feature_layers != layers:
            flag = f"--feature-layers {','.join(map(str, mine.feature_layers))}" if mine.feature_layers else (
                "no --feature-layers")
            raise ValueError(f"{source} reads target layers {mine.feature_layers or 'last (after the final norm)'}, "
                             f"not {layers or 'the last'}: pass {flag} (a drafter's input features cannot change, "
                             f"except that an --init-from drafter reading the last layer may add lower ones beside "
                             f"it, id {self.num_target_layers})")
        shape = ("k", "num_layers", "newest_pair", "chain_slots", "newest_slots", "reversed_slots", "chain_attention")
        if all(getattr(mine, name) == getattr(cfg, name) for name in shape):
            return
        held = "a drafter with " + ", ".join(f"{name}={getattr(mine, name)}" for name in shape)
        if why == "resume":
            raise ValueError(f"{source} holds {held}: resume with the same settings or use a new --out")
        parts = "".join(f" --{name.replace('_', '-')}" for name in shape[2:] if getattr(mine, name))
        raise ValueError(f"--init-from {cfg.init_from} holds {held}: pass --k {mine.k} --num-layers "
                         f"{mine.num_layers}{parts} (--newest-pair and --chain-slots may be added to a drafter "
                         f"without them, never removed; --num-layers may grow; a k=1 head may become a "
                         f"--newest-slots drafter)")

    def fresh(self, target):
        """Draft vocabulary from the data, then seeded weights (decoder layers copied from the target's last ones
        with ``--init-from-target``)."""
        from .drafters.sar_model import SARDrafterModel

        cfg = self.config
        vocab_ids = draft_vocabulary(self.train_samples, target, cfg)
        torch.manual_seed(cfg.seed)
        model = SARDrafterModel.for_target(target, k=cfg.k, num_layers=cfg.num_layers, draft_vocab=vocab_ids,
                                           newest_pair=cfg.newest_pair, chain_slots=cfg.chain_slots,
                                           newest_slots=cfg.newest_slots, reversed_slots=cfg.reversed_slots,
                                           chain_attention=cfg.chain_attention,
                                           feature_layers=self.feature_layers)
        if cfg.init_from_target:
            for mine, theirs in zip(model.layers, target.decoder.layers[-cfg.num_layers:]):
                mine.load_state_dict(theirs.state_dict())
        return model

    def keep_from_target(self, target) -> None:
        self.embed = target.model.get_input_embeddings().weight.detach()  # [V, H], frozen

    def step(self, model, step: int, rank: int, world: int) -> StepResult:
        cfg = self.config
        gen = torch.Generator().manual_seed(cfg.seed * 7919 + step * world + rank)
        samples = self.batch_samples(step, rank, world)
        if cfg.newest_slots or cfg.reversed_slots:  # token shift: glancing is the paper's layout's
            losses, slots, positions = layout_losses(model, self.embed, self.head, self.vocab_index, samples, cfg,
                                                     gen)
            record = {"slot_acc": [round(float(s.acc), 4) for s in slots]} if slots else {}
            return StepResult(losses.total, positions, (losses, record))
        batch = make_batch(samples, cfg.k, cfg.max_len).to(self.head.device)
        losses, record = csgd_step(model, self.embed, self.head, self.vocab_index, batch, cfg, glance_ratio(step, cfg),
                                   gen, self.vocab.to(self.head.device))
        return StepResult(losses.total, int(batch.key_padding.sum()), (losses, record))

    def train_record(self, result: StepResult, progress: Progress) -> dict:
        losses, record = result.details
        record = {**record, "step": progress.step, "lr": progress.lr}
        if progress.grad_norm is not None:
            record["grad_norm"] = progress.grad_norm
        record.update({n: round(float(getattr(losses, n).detach()), 4) for n in ("total", "reg", "kl", "ce", "acc")},
                      positions=losses.count, tok_per_s=round(progress.tokens / progress.seconds, 1))
        return record

    def evaluate(self, model) -> dict:
        return evaluate(model, self.embed, self.head, self.vocab, self.vocab_index, self.eval_samples, self.config)

    def describe(self, model) -> str:
        cfg = self.config
        return (f"{cfg.num_layers}-layer k={cfg.k} drafter ({model.num_parameters() / 1e6:.2f}M params, draft vocab "
                f"{len(self.vocab)}) on {len(self.train_samples)} samples, eval on {len(self.eval_samples)}")


def train(cfg: TrainConfig) -> Path | None:
    """Train (or resume) a drafter on gen-data shards with the objective ``cfg.kind`` names (sar or medusa) in the
    one training loop (:func:`.trainer.train`); returns the final drafter directory (on the main process)."""
    from . import trainer
    from .drafters.registry import shard_objectives

    objectives = shard_objectives()
    if cfg.kind not in objectives:
        raise ValueError(f"--kind must be {' or '.join(objectives)}, got {cfg.kind!r}")
    return trainer.train(objectives[cfg.kind](cfg))
