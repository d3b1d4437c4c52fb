"""Train an EAGLE-3 drafter (:mod:`.drafters.eagle3_model`) with training-time test (TTT), as EAGLE-3 does.

Data: conversations (ShareGPT's training split by default, every assistant turn) rendered with the target's chat
template; the target runs over each batch once, teacher-forced, and gives both the drafter's inputs (the inputs of
its ``feature_layers``) and the labels (its own next-token distribution at every position), so the drafter learns
the target's predictions, not the text's. Nothing is stored: the features of a 135M target cost about as much to
recompute as to read.

**Training-time test.** Step 0 runs every position j on the target's fused feature g_j and token x_{j+1}; its
output o_j must predict the target's next token at j+1. Step s (1 <= s < ``ttt_steps``) re-runs position j as the
s-th drafted token after a real prefix that ends at j - s: its feature is the drafter's own output of step s - 1
at j - 1, and it attends to real keys at positions <= j - s, to the keys of the earlier steps on its own chain
(step t at position j - s + t) and to itself, exactly what drafting depth s + 1 sees at inference. The loss of step
s is weighted ``step_decay ** s``. Labels: the target's distribution restricted to the draft vocabulary (soft
cross-entropy), on positions whose next token is assistant text.

Held-out evaluation: acc@d (d = s + 1) on self-distilled held-out answers (the committed token shards' held-out
split, ``recipes/data/sharegpt-sd``): the drafter's greedy token at step s equals the target's greedy token.

:class:`Eagle3Objective` is this objective in the one training loop (:mod:`.trainer`, which also describes the run
directory).
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .drafters.eagle3_model import Eagle3DrafterModel
from .drafters.sar_model import additive_mask, most_frequent_tokens
from .trainer import Objective, Progress, RunSummary, StepResult

log = logging.getLogger(__name__)


@dataclass
class Eagle3TrainConfig:
    out: str
    model: str = "smollm2-135m"
    data: str = "sharegpt"  # conversation source: 'sharegpt' (training split) or a .json/.jsonl file
    eval_data: str = "recipes/data/sharegpt-sd"  # token shards (held-out split) for acc@d; '' = skip
    max_samples: int = 4000  # conversations read from --data
    max_len: int = 512
    tokens_per_batch: int = 2048
    max_steps: int = 300
    ttt_steps: int = 3
    step_decay: float = 0.8
    lr: float = 5e-4
    min_lr: float = 5e-5
    warmup: int = 20
    weight_decay: float = 0.0
    grad_clip: float = 0.5
    ema_decay: float = 0.0  # > 0: evaluate and save an EMA of the weights
    draft_vocab: int = 8192
    vocab_samples: int = 500  # conversations whose target-greedy tokens choose the draft vocabulary
    eval_samples: int = 200
    eval_every: int = 100
    save_every: int = 25
    log_every: int = 1
    seed: int = 0


# ----------------------------------------------------------------------------- data
def training_samples(cfg: Eagle3TrainConfig, tokenizer) -> list:
    from .data import format_conversation, load_conversations, sharegpt_split

    convs = load_conversations(cfg.data, cfg.max_samples * 2 if cfg.data == "sharegpt" else cfg.max_samples)
    if cfg.data == "sharegpt":
        convs = sharegpt_split(convs, "train")[: cfg.max_samples]
    samples = [s for s in (format_conversation(tokenizer, c, cfg.max_len) for c in convs) if s is not None]
    return [s for s in samples if len(s.input_ids) >= 8]


def eval_samples(cfg: Eagle3TrainConfig) -> list:
    if not cfg.eval_data:
        return []
    from .token_data import iter_token_samples

    samples = [t.as_sample() for _, shard in iter_token_samples(cfg.eval_data, "heldout") for t in shard]
    return [s for s in samples if len(s.input_ids) >= 8][: cfg.eval_samples]


def batches(samples: list, tokens_per_batch: int, max_len: int, seed: int, epoch: int) -> list[list]:
    """Samples grouped by similar length into batches of about ``tokens_per_batch`` padded tokens, shuffled."""
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(seed * 1000 + epoch)).tolist()
    order.sort(key=lambda i: len(samples[i].input_ids[:max_len]) // 32)  # stable: random within a length bucket
    groups, current, width = [], [], 0
    for i in order:
        length = len(samples[i].input_ids[:max_len])
        if current and max(width, length) * (len(current) + 1) > tokens_per_batch:
            groups.append(current)
            current, width = [], 0
        current.append(samples[i])
        width = max(width, length)
    if current:
        groups.append(current)
    perm = torch.randperm(len(groups), generator=torch.Generator().manual_seed(seed * 1000 + epoch + 1)).tolist()
    return [groups[i] for i in perm]


@torch.no_grad()
def target_pass(target, group: list, layers: list[int], max_len: int) -> dict:
    """Right-padded batch: ids [B, L], lengths [B], loss mask [B, L], fused features [B, L, 3H] and the target's
    next-token logits [B, L, V] at every position."""
    ids = [s.input_ids[:max_len] for s in group]
    width = max(len(x) for x in ids)
    batch = torch.zeros(len(ids), width, dtype=torch.long)
    mask = torch.zeros(len(ids), width, dtype=torch.bool)
    for i, (x, s) in enumerate(zip(ids, group)):
        batch[i, : len(x)] = torch.tensor(x)
        mask[i, : len(x)] = torch.tensor(s.loss_mask[:max_len], dtype=torch.bool)
    lengths = torch.tensor([len(x) for x in ids])
    padding = torch.arange(width)[None] < lengths[:, None]
    with target.layer_inputs(layers) as captured:
        hidden = target.decoder(input_ids=batch, attention_mask=padding.long()).last_hidden_state
    return {"ids": batch, "lengths": lengths, "loss_mask": mask,
            "features": torch.cat(captured, dim=-1).float(),
            "logits": target.logits(hidden).float()}


# ----------------------------------------------------------------------------- training-time test
def ttt_mask(step: int, lengths: torch.Tensor, width: int, dtype: torch.dtype) -> torch.Tensor:
    """[B, 1, S, (step+1)*S] additive mask of step ``step`` over the keys of steps 0..step (S = width - 1 positions)."""
    S = width - 1
    j = torch.arange(S)
    real = j[None, :] <= (j[:, None] - step)  # step-0 key i visible iff i <= j - step
    blocks = [real]
    for t in range(1, step + 1):
        blocks.append(j[None, :] == (j[:, None] - step + t))  # step-t key on the chain: position j - step + t
    allowed = torch.cat(blocks, dim=-1)[None].expand(len(lengths), -1, -1)  # [B, S, (step+1)S]
    keys = (torch.arange(S)[None] < (lengths[:, None] - 1)).repeat(1, step + 1)  # real key positions
    allowed = allowed & keys[:, None, :]
    # a padded query must still see one key (its own, at the current step) to keep softmax finite
    own = torch.zeros(S, (step + 1) * S, dtype=torch.bool)
    own[j, step * S + j] = True
    return additive_mask((allowed | own[None])[:, None], dtype)


def ttt_losses(model: Eagle3DrafterModel, target_embedding: torch.Tensor, batch: dict, draft_index: torch.Tensor,
               cfg: Eagle3TrainConfig) -> tuple[torch.Tensor, list[float], list[int]]:
    """Weighted soft cross-entropy over ``cfg.ttt_steps`` steps; also per-step greedy hits and counts."""
    ids, lengths, width = batch["ids"], batch["lengths"], batch["ids"].shape[1]
    S = width - 1
    positions = torch.arange(S)[None].expand(len(lengths), -1)
    embeds = model.embed(target_embedding, ids[:, 1:])  # x_{j+1}
    # labels: the target's distribution at position j+1 (predicting x_{j+2}), on the draft vocabulary
    target_logits = batch["logits"][:, 1:, :].index_select(-1, model.draft_vocab)  # [B, S, D]
    target_probs = target_logits.softmax(-1)
    target_greedy = batch["logits"][:, 1:].argmax(-1)  # [B, S] target ids
    in_vocab = draft_index[target_greedy] >= 0
    has_next = torch.arange(S)[None] + 2 < lengths[:, None]  # x_{j+2} exists
    next_mask = torch.zeros_like(has_next)
    next_mask[:, : S - 1] = batch["loss_mask"][:, 2:]
    base_valid = has_next & next_mask
    cache = model.new_cache()
    features = batch["features"][:, :S]
    total = torch.zeros(())
    hits, counts = [], []
    weight_sum = sum(cfg.step_decay ** s for s in range(cfg.ttt_steps))
    for step in range(cfg.ttt_steps):
        mask = ttt_mask(step, lengths, width, model.dtype)
        outputs = model(features, embeds, positions, mask, cache)  # [B, S, H]
        valid = base_valid & (torch.arange(S)[None] >= step)
        logp = F.log_softmax(model.logits(outputs).float(), dim=-1)
        loss = -(target_probs * logp).sum(-1)
        count = int(valid.sum())
        if count:
            total = total + (cfg.step_decay ** step / weight_sum) * loss[valid].mean()
        predicted = model.draft_vocab[logp.argmax(-1)]
        hits.append(int(((predicted == target_greedy) & valid & in_vocab).sum()))
        counts.append(count)
        # the next step's feature at j is this step's output at j - 1
        features = torch.cat([outputs[:, :1] * 0, outputs[:, :-1]], dim=1)
    return total, hits, counts


# ----------------------------------------------------------------------------- the run
def choose_draft_vocab(target, samples: list, cfg: Eagle3TrainConfig) -> list[int] | None:
    """The ``draft_vocab`` tokens the target predicts most often in assistant text (EOS always in)."""
    if cfg.draft_vocab <= 0 or cfg.draft_vocab >= target.vocab_size:
        return None
    counts = torch.zeros(target.vocab_size, dtype=torch.long)
    for group in batches(samples[: cfg.vocab_samples], cfg.tokens_per_batch, cfg.max_len, cfg.seed, -1):
        batch = target_pass(target, group, [0], cfg.max_len)
        greedy = batch["logits"].argmax(-1)[:, :-1][batch["loss_mask"][:, 1:]]
        counts += torch.bincount(greedy.flatten(), minlength=target.vocab_size)
    return most_frequent_tokens(counts, cfg.draft_vocab, always=sorted(target.eos_token_ids)).tolist()


@torch.no_grad()
def evaluate(model, target, samples: list, cfg: Eagle3TrainConfig, draft_index: torch.Tensor) -> dict:
    hits = [0] * cfg.ttt_steps
    counts = [0] * cfg.ttt_steps
    loss_sum, groups = 0.0, 0
    for group in batches(samples, cfg.tokens_per_batch, cfg.max_len, 0, 0):
        batch = target_pass(target, group, model.feature_layers, cfg.max_len)
        loss, h, c = ttt_losses(model, target.model.get_input_embeddings().weight, batch, draft_index, cfg)
        loss_sum, groups = loss_sum + float(loss), groups + 1
        hits = [a + b for a, b in zip(hits, h)]
        counts = [a + b for a, b in zip(counts, c)]
    return {"eval_loss": loss_sum / max(groups, 1), "eval_samples": len(samples),
            **{f"acc@{s + 1}": hits[s] / max(counts[s], 1) for s in range(cfg.ttt_steps)}}


class Eagle3Objective(Objective):
    """EAGLE-3 with training-time test (``falconspec train-eagle3``), one process: the target runs teacher-forced
    over every batch of conversations."""

    name = "eagle3"

    def setup(self, device, checkpoint):
        from .models import load_target

        cfg = self.config
        torch.manual_seed(cfg.seed)
        target = load_target(cfg.model, dtype="float32")
        for p in target.model.parameters():
            p.requires_grad_(False)
        self.target = target  # runs every step: it gives the inputs and the labels
        self.samples = training_samples(cfg, target.tokenizer)
        self.held = eval_samples(cfg)
        if checkpoint is not None:
            model = Eagle3DrafterModel.from_pretrained(checkpoint, target)
        else:
            model = Eagle3DrafterModel.for_target(target, draft_vocab=choose_draft_vocab(target, self.samples, cfg))
        self.draft_index = torch.full((target.vocab_size,), -1, dtype=torch.long)  # target id -> draft id, or -1
        self.draft_index[model.draft_vocab] = torch.arange(len(model.draft_vocab))
        self.embedding = target.model.get_input_embeddings().weight
        self.batches_per_epoch = len(batches(self.samples, cfg.tokens_per_batch, cfg.max_len, cfg.seed, 0))
        return model

    def step(self, model, step: int, rank: int, world: int) -> StepResult:
        cfg = self.config
        epoch, index = divmod(step, self.batches_per_epoch)
        group = batches(self.samples, cfg.tokens_per_batch, cfg.max_len, cfg.seed, epoch)[index]
        batch = target_pass(self.target, group, model.feature_layers, cfg.max_len)
        loss, hits, counts = ttt_losses(model, self.embedding, batch, self.draft_index, cfg)
        return StepResult(loss, int(batch["lengths"].sum()), (epoch, hits, counts))

    def train_record(self, result: StepResult, progress: Progress) -> dict:
        epoch, hits, counts = result.details
        return {"step": progress.step, "loss": float(result.loss.detach()), "lr": progress.lr, "epoch": epoch,
                **{f"train_acc@{s + 1}": hits[s] / max(counts[s], 1) for s in range(self.config.ttt_steps)},
                "tokens": progress.tokens, "elapsed": progress.seconds}

    def evaluate(self, model) -> dict | None:
        return evaluate(model, self.target, self.held, self.config, self.draft_index) if self.held else None

    def eval_record(self, entry: dict) -> dict:
        return entry

    def session(self) -> dict:
        return {"data": self.config.data, "training_conversations": len(self.samples)}

    def describe(self, model) -> str:
        return (f"an EAGLE-3 drafter ({model.num_parameters() / 1e6:.2f}M params, draft vocab "
                f"{len(model.draft_vocab)}) on {len(self.samples)} conversations in {self.batches_per_epoch} "
                f"batches per epoch, eval on {len(self.held)} held-out samples")

    def recipe(self, model, run: RunSummary) -> dict:
        cfg = self.config
        metrics = {k: v for k, v in run.history[-1].items() if k != "step"} if run.history else {}
        return {"trainer": "falconspec.train_eagle3", "config": asdict(cfg), "steps": run.step,
                "training_conversations": len(self.samples), "metrics": metrics,
                "command": "falconspec train-eagle3 " + " ".join(
                    f"--{k.replace('_', '-')} {v}" for k, v in asdict(cfg).items() if k != "out") + f" --out {cfg.out}"}


def train(cfg: Eagle3TrainConfig) -> Path:
    """Train (or resume) an EAGLE-3 drafter in the one training loop; returns the final drafter directory."""
    from . import trainer

    return trainer.train(Eagle3Objective(cfg))
