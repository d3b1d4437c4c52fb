"""What the training objectives share (:mod:`.trainer` runs them): the learning-rate schedule, atomic
checkpoints and the run log; and for the objectives over gen-data shards (``falconspec train``: CSGD for SAR
drafters in :mod:`.train`, Medusa heads in :mod:`.train_medusa`) their settings, resumable data order, the draft
vocabulary, loading the shards, :class:`ShardObjective` and the recipe's description of the data slice.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)


def _opt(default, help_text: str):
    return field(default=default, metadata={"help": help_text})


@dataclass
class TrainConfig:
    """Settings of a training run (``falconspec train`` builds its flags from these fields and their help)."""
    data: str = field(metadata={"help": "gen-data feature directory, or a token dataset (gen-data --format tokens, "
                                        "e.g. recipes/data/sharegpt-sd: its train split, features computed by the "
                                        "target as steps read them), or several token datasets separated by "
                                        "commas, read as one"})
    out: str = field(metadata={"help": "run directory: checkpoint/, drafter/, log.jsonl"})
    eval_data: str = _opt("", "gen-data directory of held-out conversations, or a token dataset (its held-out "
                              "split) (default: the last --eval-samples of --data)")
    eval_split: str = _opt("heldout", "split of a token dataset --eval-data is read from: heldout, or all (every shard, "
                                      "e.g. the target's MT-bench answers from gen-data --source mt-bench --split all)")
    model: str = _opt("smollm2-135m", "target model the data was generated with")
    kind: str = _opt("sar", "training objective: sar, a SAR drafter trained with CSGD (--k 2: Falcon, --k 1: "
                            "EAGLE-style head); medusa, Medusa heads (--medusa-heads)")
    k: int = _opt(2, "tokens per drafter forward: 2 = Falcon SAR drafter, 1 = EAGLE-style head")
    medusa_heads: int = _opt(4, "number of Medusa heads (--kind medusa)")
    num_layers: int = _opt(1, "drafter decoder layers (more than an --init-from drafter has: the appended ones "
                                 "start as copies of its last layer that pass their input through unchanged)")
    init_from_target: bool = _opt(False, "initialize the drafter's decoder layers from the target's last layers")
    feature_layers: str = _opt("", "SAR: EAGLE-3-style multi-layer features: the drafter reads the inputs of these "
                                   "target decoder layers side by side (comma-separated ids, or 'auto': a low, a "
                                   "middle and a high one, 2, L/2 and L-3) instead of the target's last layer; "
                                   "id L (the number of target layers) is their output after the final norm, what a "
                                   "drafter without the flag reads, so an --init-from drafter without it can grow "
                                   "into one reading e.g. 2,15,L; needs a token dataset as --data (features "
                                   "computed on the fly)")
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
    grown_lr: float = _opt(0.0, "peak learning rate of the parts --init-from grows the drafter by (more --num-layers, "
                                "--newest-pair, --chain-slots, a head's chain), on the same schedule scaled to it; "
                                "0: --lr, as every other parameter")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    grad_clip: float = _opt(1.0, "gradient norm clip (0 = off)")
    ema_decay: float = _opt(0.0, "keep an exponential moving average of the weights with this decay per step (e.g. "
                                 "0.99), started at the initial weights; evaluate and save it as the drafter (0 = off)")
    dtype: str = _opt("float32", "float32, or bfloat16 autocast (fast only on CPUs/GPUs with native bf16)")
    feature_dtype: str = _opt("float32", "--data a token dataset: the dtype the target computes its train features in "
                                         "(bfloat16: faster on CPUs with native bf16; held-out features stay float32)")
    reg_weight: float = _opt(1.0, "weight of the SmoothL1 feature regression")
    dist_weight: float = _opt(0.1, "weight of the distillation loss")
    later_slot_weight: float = _opt(1.0, "loss weight of the later slots of a SAR block relative to its first (slot s "
                                         "of a block weighs w**s; k=2: the block's second token)")
    newest_pair: bool = _opt(False, "SAR k>=2: every slot of a block also reads the block's newest (feature, token) "
                                    "pair directly (the block's first slot drafts the nearest token)")
    chain_slots: bool = _opt(False, "SAR k>=2: slot i>0 of a block reads the token drafted at slot i-1 through a small "
                                    "MLP on its output, per candidate (the block's second token conditioned on its "
                                    "first)")
    newest_slots: bool = _opt(False, "SAR k>=2: every slot of a block drafts from the block's newest position (causal "
                                     "mask; slot 0 as a k=1 head drafts, later slots by the chain, so it implies "
                                     "--chain-slots), trained by teacher forcing at every position and slot, without "
                                     "glancing; --init-from may name a k=1 head (its decoder drafts slot 0)")
    detach_chain: bool = _opt(False, "with --newest-slots: the later slots' losses train the chain alone, not the "
                                     "decoder, which then learns slot 0 exactly as a k=1 head")
    chain_attention: bool = _opt(False, "with --newest-slots: before the chain, the later slots also attend to the "
                                        "last decoder layer's keys and values of what the block's newest position "
                                        "sees (one query per candidate, no second decoder pass)")
    reversed_slots: bool = _opt(False, "SAR k>=2: the paper's relaxed causal mask with each block's slots drafted "
                                       "from its positions in reverse (the first token from the newest position, as "
                                       "a k=1 head drafts it, later ones from older positions that see the whole "
                                       "block), trained by token shift without glancing")
    every_alignment: bool = _opt(False, "SAR k>=2: train every sequence of a step at each of the k block alignments, "
                                        "so every position is once the first slot of a block (the depth-1 draft) "
                                        "and once each later slot, at k times the cost of a step (default: one "
                                        "random alignment per sequence)")
    ttt_blocks: int = _opt(0, "SAR: training-time test: after the teacher-forced pass, unroll this many drafted blocks "
                              "per position, each fed the drafter's own predicted features and tokens of the block "
                              "before and attending as drafting does, and train on them too")
    ttt_weight: float = _opt(0.8, "loss weight of the s-th unrolled block relative to the teacher-forced pass: w**s")
    kl_weight: float = _opt(0.9, "share of KL(target || drafter) in the distillation loss; the rest is CE to the "
                                  "target's greedy token")
    distill_topk: int = _opt(0, "top-k distillation: the KL from the target's k most likely draft tokens, "
                                "renormalised (0 = the whole draft vocabulary)")
    temperature: float = _opt(1.0, "distillation temperature (both distributions)")
    feature_noise: float = _opt(0.1, "uniform noise U(-x, x) added to input features (train only)")
    eval_every: int = _opt(100, "held-out evaluation (loss, acc@1..8) every N steps")
    eval_samples: int = _opt(32, "held-out sequences per evaluation")
    eval_window_seed: int = _opt(0, "seed of the fixed per-position keys that choose which held-out windows a sample "
                                    "with more than 16 is scored on (the same windows for every run and k; another "
                                    "seed: another draw)")
    eval_answer_opening: int = _opt(0, "score only held-out drafting windows that start among the first N tokens of "
                                       "an answer (0 = every window; MT-bench's 64-token answers are openings only)")
    save_every: int = _opt(200, "checkpoint every N steps")
    log_every: int = _opt(10, "training log line every N steps")
    seed: int = _opt(0, "seed for data order, noise and glancing")

    def __post_init__(self) -> None:
        if self.distill_topk < 0:
            raise ValueError(f"--distill-topk must be >= 0, got {self.distill_topk}")
        if self.eval_answer_opening < 0:
            raise ValueError(f"--eval-answer-opening must be >= 0, got {self.eval_answer_opening}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"--ema-decay must be in [0, 1), got {self.ema_decay}")
        if self.grown_lr < 0:
            raise ValueError(f"--grown-lr must be >= 0, got {self.grown_lr}")
        if self.ttt_blocks < 0:
            raise ValueError(f"--ttt-blocks must be >= 0, got {self.ttt_blocks}")
        if self.eval_split not in ("heldout", "all"):
            raise ValueError(f"--eval-split must be heldout or all, got {self.eval_split!r}")
        if self.feature_dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"--feature-dtype must be float32, bfloat16 or float16, got {self.feature_dtype!r}")
        sar_only = {"--every-alignment": "trains a SAR drafter's block alignments",
                    "--ttt-blocks": "unrolls a SAR drafter's blocks",
                    "--feature-layers": "gives a SAR drafter multi-layer features"}
        for flag, what in sar_only.items():
            if getattr(self, flag[2:].replace("-", "_")) and self.kind != "sar":
                raise ValueError(f"{flag} {what}: it needs --kind sar, not {self.kind!r}")
        layouts = {  # flag: (set, what it does, the flags it excludes)
            "--newest-slots": (self.newest_slots, "drafts a block's k >= 2 tokens from its newest position",
                               {"--newest-pair": self.newest_pair, "--every-alignment": self.every_alignment,
                                "--ttt-blocks": self.ttt_blocks}),
            "--reversed-slots": (self.reversed_slots, "drafts a block's k >= 2 slots from its positions in reverse",
                                 {"--newest-slots": self.newest_slots, "--ttt-blocks": self.ttt_blocks,
                                  "--later-slot-weight": self.later_slot_weight != 1.0}),
        }
        for flag, (on, what, excluded) in layouts.items():
            if on and (self.kind != "sar" or self.k < 2):
                raise ValueError(f"{flag} {what}: it needs --kind sar and --k 2 or more, not --kind {self.kind} "
                                 f"--k {self.k}")
            clash = [name for name, set_too in excluded.items() if on and set_too]
            if clash:
                raise ValueError(f"{flag} excludes {', '.join(clash)}")
        if self.newest_slots:
            self.chain_slots = True  # its later slots are the chain's
        if self.detach_chain and not self.newest_slots:
            raise ValueError("--detach-chain stops the later slots' gradients at a --newest-slots drafter's chain: "
                             "add --newest-slots")
        if self.chain_attention and not self.newest_slots:
            raise ValueError("--chain-attention attends from a --newest-slots drafter's newest position: add "
                             "--newest-slots")
        if self.every_alignment and self.k < 2:
            raise ValueError("--every-alignment trains each of a block's k alignments: with --k 1 there is only one "
                             "(drop the flag)")


def lr_at(step: int, cfg) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at max_steps (``cfg``: any run config with those fields)."""
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


def draft_vocabulary(samples: Sequence[dict], target, cfg: TrainConfig) -> torch.Tensor | None:
    """The ``cfg.draft_vocab`` tokens the target most often produces inside assistant text of the training data,
    plus (if ``cfg.vocab_corpus``) the tokens of the assistant turns of a larger corpus; EOS is always in."""
    from .data import load_conversations, sharegpt_split
    from .drafters.sar_model import most_frequent_tokens
    from .token_data import TokenFeatures

    vocab_size = target.vocab_size
    if cfg.draft_vocab <= 0 or cfg.draft_vocab >= vocab_size:
        return None
    if isinstance(samples, TokenFeatures):  # token data: its answers are the target's own greedy tokens
        counts = samples.answer_token_counts(vocab_size)
    else:
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


def resolve_feature_layers(spec: str, num_layers: int) -> list[int] | None:
    """``--feature-layers``: '' -> None (the target's last layer), 'auto' -> EAGLE-3's low, middle and high layers,
    else comma-separated layer ids of a ``num_layers``-layer target (id i: layer i's input; ``num_layers``: the
    decoder's output after its final norm)."""
    from .adapter import check_feature_layers
    from .drafters.eagle3_model import default_feature_layers

    if not spec:
        return None
    if spec == "auto":
        return default_feature_layers(num_layers)
    try:
        layers = [int(part) for part in spec.split(",")]
    except ValueError:
        raise ValueError(f"--feature-layers takes 'auto' or comma-separated layer ids, got {spec!r}") from None
    return check_feature_layers(layers, num_layers, "--feature-layers")


def load_data(cfg: TrainConfig, target) -> tuple[Sequence[dict], list[dict], dict]:
    """The train samples (a sequence of sample dicts), the held-out samples (in memory) and the train data's meta.
    ``--data``/``--eval-data`` are feature directories (``gen-data``) or token datasets (``gen-data --format
    tokens``), whose features ``target`` computes as steps read them (:class:`.token_data.TokenFeatures`; the
    held-out split of a token dataset for ``--eval-data``), the train split's in ``--feature-dtype``; held-out
    features are computed by ``target`` (fp32) either way, also those carved from ``--data`` without ``--eval-data``.
    With ``--feature-layers`` every sample also holds those layers' inputs (``layer_inputs``)."""
    from .data import ShardDataset
    from .models import load_target
    from .token_data import TokenFeatures, is_token_dataset, token_dataset_dirs

    layers = resolve_feature_layers(cfg.feature_layers, target.config.num_hidden_layers)

    def read(path: str, split: str, check_weights: bool = True):
        listed = token_dataset_dirs(path)
        if len(listed) > 1 and not is_token_dataset(path):
            raise ValueError(f"{path}: only token datasets (gen-data --format tokens) can be listed together, and "
                             f"{', '.join(d for d in listed if not is_token_dataset(d))} is not one")
        if is_token_dataset(path):
            return TokenFeatures(path, target, cfg.model, split=split, max_len=cfg.max_len,
                                 check_weights=check_weights, feature_layers=layers)
        if layers:
            raise ValueError(f"--feature-layers needs the target's layer inputs, computed on the fly from a token "
                             f"dataset (gen-data --format tokens), but {path} holds stored last-layer features")
        if split == "train" and cfg.feature_dtype != "float32":
            raise ValueError(f"--feature-dtype {cfg.feature_dtype} sets the dtype of features computed from a token "
                             f"dataset, but {path} holds stored features (gen-data --from-tokens --dtype makes them)")
        data = ShardDataset(path)
        size = data.samples[0]["hidden_states"].shape[-1]
        if size != target.hidden_size:
            raise ValueError(f"{path} holds features of size {size}, but target {cfg.model!r} has hidden size "
                             f"{target.hidden_size}: generate data with this target")
        return data

    data = read(cfg.data, "train")
    train_samples = data if isinstance(data, TokenFeatures) else list(data.samples)
    if cfg.eval_data:
        checked = is_token_dataset(cfg.data) and Path(cfg.eval_data).resolve() in {
            Path(d).resolve() for d in token_dataset_dirs(cfg.data)}
        held = read(cfg.eval_data, cfg.eval_split, check_weights=not checked)  # one weights hash per token dataset
        if held.meta.get("model") != data.meta.get("model"):
            raise ValueError(f"--eval-data was generated with {held.meta.get('model')!r}, --data with "
                             f"{data.meta.get('model')!r}")
        overlap = set(held.ids) & set(data.ids)
        if overlap:
            raise ValueError(f"--eval-data shares {len(overlap)} conversations with --data (e.g. {min(overlap)!r})")
        eval_samples = [held[i] for i in range(min(cfg.eval_samples, len(held)))]
    else:
        if len(train_samples) <= cfg.eval_samples:
            raise ValueError(f"{cfg.data} has {len(train_samples)} samples: too few to hold out --eval-samples "
                             f"{cfg.eval_samples}; pass --eval-data or lower --eval-samples")
        held = train_samples[-cfg.eval_samples:]
        train_samples, eval_samples = train_samples[: -cfg.eval_samples], [held[i] for i in range(len(held))]
    if cfg.feature_dtype != "float32":  # a token dataset (read refuses stored features); held-out stays fp32
        train_samples = train_samples.computed_by(load_target(cfg.model, dtype=cfg.feature_dtype,
                                                              device=target.device))
        return train_samples, eval_samples, train_samples.meta
    return train_samples, eval_samples, data.meta


def draft_index(labels: torch.Tensor, vocab_index: torch.Tensor) -> torch.Tensor:
    """Target token ids -> draft-vocabulary indices (-1 where the token is outside the draft vocabulary or the
    label is missing, -1)."""
    return vocab_index[labels.clamp(min=0)].masked_fill(labels < 0, -1)


def distillation_losses(draft_logits: torch.Tensor, target_logits: torch.Tensor, labels: torch.Tensor,
                        weights: torch.Tensor | None = None,
                        topk: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """KL(target || drafter) and CE to the target's greedy token (draft indices ``labels`` [n]; -1 = not in the
    draft vocabulary, left out), both over the draft vocabulary, from logits [n, D], averaged with per-position
    ``weights`` [n] (default: equal); also the drafter's log-probabilities [n, D]. ``topk`` > 0: top-k distillation,
    the KL from the target's ``topk`` most likely tokens renormalised (the drafter's log-probabilities stay those of
    the whole draft vocabulary; ``topk`` 1 is the CE to the greedy token)."""
    draft_logp = draft_logits.log_softmax(-1)
    if 0 < topk < target_logits.shape[-1]:
        top = target_logits.topk(topk, dim=-1)
        target_logp, draft_part = top.values.log_softmax(-1), draft_logp.gather(-1, top.indices)
    else:
        target_logp, draft_part = target_logits.log_softmax(-1), draft_logp
    kl = weighted_mean((target_logp.exp() * (target_logp - draft_part)).sum(-1), weights)
    has_label = labels >= 0
    if not has_label.any():
        ce = draft_logp.sum() * 0
    elif weights is None:
        ce = F.nll_loss(draft_logp[has_label], labels[has_label])
    else:
        nll = -draft_logp[has_label].gather(-1, labels[has_label, None])[:, 0]
        ce = weighted_mean(nll, weights[has_label])
    return kl, ce, draft_logp


def autocast(cfg: TrainConfig, device_type: str = "cpu"):
    """The training step's precision context: bfloat16 autocast for ``--dtype bfloat16``, else full float32."""
    if cfg.dtype in ("bfloat16", "bf16"):
        return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
    if cfg.dtype not in ("float32", "fp32"):
        raise ValueError(f"dtype must be float32 or bfloat16, got {cfg.dtype!r}")
    return contextlib.nullcontext()


def weighted_mean(values: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    return values.mean() if weights is None else (values * weights).sum() / weights.sum()


def rollout_starts(sample: dict, k: int, depth: int, opening: int = 0) -> torch.Tensor:
    """The held-out acc@d windows of a gen-data sample: positions t where drafting x_{t+1..t+depth} can be scored:
    the root x_t and k earlier features exist, the window is assistant text, and the data follows the target's
    greedy tokens in it (so the target's answer to every drafted prefix is known). ``opening`` > 0 keeps only the
    windows whose first token x_{t+1} is among the first ``opening`` tokens of its answer."""
    ids, greedy, mask = sample["input_ids"].long(), sample["target_tokens"].long(), sample["loss_mask"].bool()
    L = len(ids)
    t = torch.arange(k, max(L - depth, k))
    if len(t) == 0:
        return t
    window = t[:, None] + torch.arange(1, depth + 1)[None]  # [n, depth] positions of x_{t+1..t+depth}
    ok = mask[window].all(-1) & (ids[window] == greedy[window - 1]).all(-1)
    if opening:
        index = torch.arange(L)
        answer_start = torch.where(mask & ~torch.cat([mask.new_zeros(1), mask[:-1]]), index, 0).cummax(0).values
        ok &= (t + 1 - answer_start[t + 1]) < opening
    return t[ok]


def chain_accuracy(chains: list[torch.Tensor]) -> dict:
    """acc@1..d from per-window chains [n, d] (1 while every drafted token so far equals the target's greedy
    token): the share of windows whose first d drafted tokens are all right, so the sum over d is the expected
    accepted chain length; plus the number of windows (``rollouts``). Empty without windows."""
    if not chains:
        return {}
    acc = torch.cat(chains).float().mean(0)
    return {**{f"acc@{d + 1}": round(float(acc[d]), 4) for d in range(len(acc))},
            "rollouts": sum(len(c) for c in chains)}


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
    from .drafters import drafter_directory

    return drafter_directory(cfg.model, cfg.init_from)


def describe_slice(meta: dict) -> str:
    """Which conversations a gen-data directory holds, in words (for recipe.json)."""
    split = {"all": "all conversations", "train": "the train split", "heldout": "the held-out split"}[meta["split"]]
    first = f"the first {meta['num_conversations']}" if meta.get("limit") else "all"
    return (f"{first} conversations opening with a user turn, from {split} (falconspec.data.is_heldout, "
            f"{meta['heldout_percent']}%) of {meta['source']!r} in file order; {meta['mode']} answers; "
            f"cut to {meta['max_len']} tokens")


def log_record(out: Path, record: dict) -> None:
    with open(out / "log.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
    log.info("%s", json.dumps(record))


def eval_history(out: str | Path) -> list[dict]:
    """The held-out evaluations a run directory's ``log.jsonl`` records, in order (none if it has no log)."""
    path = Path(out) / "log.jsonl"
    if not path.is_file():
        return []
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [r["eval"] for r in records if "eval" in r]


class ShardObjective:
    """Mixin of the :class:`~.trainer.Objective` s that train on gen-data shards (``falconspec train --kind``): the
    target, the train and held-out samples, the drafter (resumed, ``--init-from`` or fresh), the frozen head rows
    it scores with, and the recipe. A subclass says how its drafter loads (:meth:`load`), is checked against the
    settings (:meth:`check`) and is made fresh (:meth:`fresh`)."""

    config: TrainConfig

    def precision(self):
        """``--dtype``: bf16 autocast around every training step, whatever the objective."""
        return autocast(self.config, self.head.device.type)

    def setup(self, device: torch.device, checkpoint: Path | None):
        from .models import load_target

        cfg = self.config
        target = load_target(cfg.model, device=device)
        # the target layers whose inputs a (SAR) drafter reads; None: its last layer
        self.num_target_layers = target.config.num_hidden_layers
        self.feature_layers = resolve_feature_layers(cfg.feature_layers, self.num_target_layers)
        self.train_samples, self.eval_samples, self.data_meta = load_data(cfg, target)
        if checkpoint is not None or cfg.init_from:
            source = checkpoint if checkpoint is not None else resolve_init_from(cfg)
            why = "resume" if checkpoint is not None else "init_from"
            loaded = self.load(source, target)
            had = {name for name, _ in loaded.named_parameters()}
            model = self.adapt(loaded, why)
            self.check(model, why, source)
            self.grown = tuple(name for name, _ in model.named_parameters() if name not in had)
        else:
            model = self.fresh(target)
        self.head = model.head_weight(target.lm_head.weight.detach()).float()  # [D, H], frozen
        self.vocab = model.draft_vocab if model.draft_vocab is not None else torch.arange(target.vocab_size)  # [D]
        vocab_index = torch.full((target.vocab_size,), -1, dtype=torch.long)  # target id -> draft index, or -1
        vocab_index[self.vocab.cpu()] = torch.arange(len(self.vocab))
        self.vocab_index = vocab_index.to(device)
        self.keep_from_target(target)  # the target itself is not kept: only the frozen tensors the objective needs
        return model

    def parameter_groups(self, model, grown: list[str]) -> list[dict]:
        """With ``--grown-lr``, the parameters ``grown`` (those an ``--init-from`` drafter was grown by) in a group
        of their own whose rate is the schedule's scaled to that peak; else one group."""
        cfg = self.config
        if not cfg.grown_lr or not grown:
            if cfg.grown_lr:
                log.warning("--grown-lr %g: the drafter was not grown, every parameter trains at --lr", cfg.grown_lr)
            return super().parameter_groups(model, grown)  # Objective's: one group
        named, new = dict(model.named_parameters()), set(grown)
        return [{"params": [p for name, p in named.items() if name not in new]},
                {"params": [named[name] for name in grown], "lr_scale": cfg.grown_lr / cfg.lr}]

    def load(self, directory: str | Path, target):
        """The drafter module saved in ``directory`` (a checkpoint to resume, or ``--init-from``)."""
        raise NotImplementedError

    def adapt(self, model, why: str):
        """The loaded drafter to train (``why``: ``resume`` or ``init_from``), e.g. one grown by parts the settings
        add to an ``--init-from`` drafter; by default the drafter itself."""
        return model

    def check(self, model, why: str, source) -> None:
        """Refuse a loaded drafter that does not match the settings (``why``: ``resume`` or ``init_from``)."""

    def fresh(self, target):
        """An untrained drafter for ``target``."""
        raise NotImplementedError

    def keep_from_target(self, target) -> None:
        """Keep what the objective needs of the target (e.g. its frozen embedding)."""

    def session(self) -> dict:
        return {"data": self.config.data, "train_samples": len(self.train_samples)}

    def batch_samples(self, step: int, rank: int, world: int) -> list[dict]:
        """This process's training samples of ``step``."""
        return [self.train_samples[i] for i in batch_indices(len(self.train_samples), step, self.config, rank, world)]

    def recipe(self, model, run) -> dict:
        from .trainer import command_line

        cfg, meta = self.config, self.data_meta
        return {"command": command_line(), "config": asdict(cfg), "data": meta, "data_slice": describe_slice(meta),
                "seed": cfg.seed, "train_samples": len(self.train_samples), "eval_samples": len(self.eval_samples),
                "processes": run.processes, "parameters": model.num_parameters(), "sessions": run.sessions,
                "history": run.history, "final": run.history[-1] if run.history else {}}
