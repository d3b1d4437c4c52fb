"""Answer files in Spec-Bench's schema: one JSONL file per (dataset, method, dtype, temperature), one line per prompt.

Each line holds Spec-Bench's fields (``question_id``, ``category``, ``answer_id``, ``model_id``, ``tstamp`` and
``choices[0]`` with per-turn ``turns``, ``decoding_steps``, ``new_tokens``, ``wall_time`` and the flat
``accept_lengths`` list its ``speed.py`` reads), plus ours: ``method``, ``dtype``, ``temperature``,
``peak_rss_mb`` and, inside the choice, per-turn ``accept_lengths_per_turn``, ``output_ids``, ``finish_reason``,
``seed``, ``drafted_tokens``, ``accepted_tokens``, ``draft_time``, ``verify_time``, ``prefill_time`` and
``plan_cycles`` (verification cycles per planned budget, e.g. ``{"4n/d2": 30, "plain": 5}``).
A line is written only once every method has answered that prompt, so a file never holds half a prompt.
"""

from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .methods import TurnResult

PER_TURN_EXTRAS = ("finish_reason", "seed", "drafted_tokens", "accepted_tokens", "draft_time", "verify_time",
                   "prefill_time", "plan_cycles")


@dataclass
class PromptRecord:
    """One method's answers to every turn of one prompt."""

    question_id: str | int
    category: str
    turns: list[TurnResult]
    peak_rss_mb: float | None = None  # the process's resident memory peak while this method answered

    @property
    def new_tokens(self) -> int:
        return sum(len(t.token_ids) for t in self.turns)

    @property
    def wall_time(self) -> float:
        return sum(t.wall_time for t in self.turns)


@dataclass(frozen=True)
class AnswerKey:
    dataset: str
    method: str
    dtype: str
    temperature: float

    def path(self, out: Path) -> Path:
        return Path(out) / "answers" / self.dataset / f"{self.method}-{self.dtype}-t{self.temperature:g}.jsonl"


def to_answer(record: PromptRecord, key: AnswerKey, model_id: str) -> dict:
    turns = record.turns
    choice = {
        "index": 0,
        "turns": [t.text for t in turns],
        "decoding_steps": [len(t.accept_lengths) for t in turns],
        "new_tokens": [len(t.token_ids) for t in turns],
        "wall_time": [t.wall_time for t in turns],
        "accept_lengths": [n for t in turns for n in t.accept_lengths],
        "accept_lengths_per_turn": [t.accept_lengths for t in turns],
        "output_ids": [t.token_ids for t in turns],
    }
    choice.update({name: [getattr(t, name) for t in turns] for name in PER_TURN_EXTRAS})
    return {"question_id": record.question_id, "category": record.category, "answer_id": uuid.uuid4().hex,
            "model_id": f"{model_id}-{key.method}-{key.dtype}", "method": key.method, "dtype": key.dtype,
            "temperature": key.temperature, "choices": [choice], "peak_rss_mb": record.peak_rss_mb,
            "tstamp": time.time()}


def from_answer(answer: dict) -> PromptRecord:
    choice = answer["choices"][0]
    turns = []
    for i, text in enumerate(choice["turns"]):
        extras = {name: choice[name][i] for name in PER_TURN_EXTRAS if name in choice}  # older files lack plans
        turns.append(TurnResult(choice["output_ids"][i], text, choice["wall_time"][i],
                                choice["accept_lengths_per_turn"][i], **extras))
    return PromptRecord(answer["question_id"], answer["category"], turns, answer.get("peak_rss_mb"))


def append_answers(out: Path, key: AnswerKey, records: list[PromptRecord], model_id: str) -> None:
    path = key.path(out)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(to_answer(record, key, model_id)) + "\n")


def read_answers(out: Path, key: AnswerKey) -> dict:
    """question_id -> PromptRecord from an answer file (the last line wins for a repeated id); {} if absent."""
    path = key.path(out)
    if not path.exists():
        return {}
    records = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = from_answer(json.loads(line))
            except (json.JSONDecodeError, KeyError, IndexError, TypeError) as err:
                raise ValueError(f"{path}:{lineno} is not a falconspec answer line ({err}): delete the file or use "
                                 "a new --out directory") from err
            records[record.question_id] = record
    return records
