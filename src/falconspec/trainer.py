"""The one training loop: every trained drafter kind is an :class:`Objective` run by :func:`train`.

The loop owns what all drafters train alike: resuming from ``checkpoint/``, AdamW (betas 0.9/0.95), the learning
rate of every step (:func:`.train_common.lr_at`: linear warmup, cosine decay), gradient-norm clipping, the
``log.jsonl`` records every ``log_every`` steps (and at step 1), the held-out evaluation every ``eval_every``
steps (and at the last), atomic checkpoints every ``save_every`` steps (and at the last), and the final
``drafter/`` directory with its ``recipe.json``; every ``log_every`` steps each process hands the memory its
allocator kept from freed batches back to the system (glibc's ``malloc_trim``). With ``ema_decay`` > 0 it also
keeps an exponential moving average of the weights (:class:`torch.optim.swa_utils.AveragedModel`, started at the
initial weights, updated after every step, kept in the checkpoint); the evaluations that enter the history, and
the final drafter, are then the average's, and the trained weights' evaluation is logged beside it
(``eval_trained``). It runs through :mod:`accelerate`, so an objective that says so trains on GPUs or in several
processes (``torchrun``); the others run in one CPU process.

An objective brings what differs: building the drafter (fresh, ``--init-from``, or resumed), the loss of one step,
the held-out metrics (acc@1..d), the optimizer's parameter groups (e.g. the parts an ``--init-from`` drafter was grown
by at a rate of their own, ``--grown-lr``), and the shape of its log records and recipe. Objectives today: SAR/CSGD for
Falcon (k=2) and EAGLE-style (k=1) drafters (:mod:`.train`), Medusa heads (:mod:`.train_medusa`) and EAGLE-3 with
training-time test (:mod:`.train_eagle3`); :mod:`.drafters.registry` names each drafter kind's objective.

Run directory: ``log.jsonl``, ``checkpoint/`` (drafter files + ``state.pt``: optimizer, step, the grown parameters'
names, eval history, sessions, config; re-running the same command resumes from it), ``drafter/`` (final drafter +
``recipe.json``).
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import logging
import sys
import time
from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from .train_common import log_record, lr_at, save_checkpoint

log = logging.getLogger(__name__)

CHECKPOINT_DIR, FINAL_DIR, STATE_FILE, RECIPE_FILE = "checkpoint", "drafter", "state.pt", "recipe.json"


@dataclass
class StepResult:
    """What an objective's training step returns: the loss to back-propagate, the tokens the step read (for
    throughput) and whatever its log record needs (``details``)."""
    loss: torch.Tensor
    tokens: int = 0
    details: Any = None


@dataclass
class Progress:
    """Where the loop stands when a step's record is written."""
    step: int  # steps done, this one included
    lr: float  # the step's learning rate
    grad_norm: float | None  # before clipping; None without clipping
    seconds: float  # since this process started training
    tokens: int  # read by this process since it started


@dataclass
class RunSummary:
    """What the loop knows at the end, for the recipe."""
    step: int
    history: list[dict]  # held-out evaluations, ``{"step": s, **metrics}``
    sessions: list[dict]  # one per start or resume of the run
    processes: int


class Objective(ABC):
    """A drafter kind's training objective.

    ``config`` is its run's settings; the loop reads ``out``, ``max_steps``, ``lr``, ``min_lr``, ``warmup``,
    ``weight_decay``, ``grad_clip``, ``ema_decay``, ``log_every``, ``eval_every``, ``save_every`` and ``seed`` from
    it and stores all of it (``dataclasses.asdict``) in checkpoints.
    """

    name: str  # what falconspec calls the objective (``falconspec train --kind NAME`` for gen-data objectives)
    accelerated = False  # True: accelerate's device and processes (GPUs, torchrun); False: one CPU process
    grown: tuple[str, ...] = ()  # set by setup: names of the parameters an --init-from drafter was grown by

    def __init__(self, config):
        self.config = config

    @abstractmethod
    def setup(self, device: torch.device, checkpoint: Path | None) -> nn.Module:
        """Load the target and the data; return the drafter module to train: loaded from ``checkpoint`` when the
        run resumes (its weights; the loop restores the rest), else fresh or from ``--init-from``."""

    @abstractmethod
    def step(self, model: nn.Module, step: int, rank: int, world: int) -> StepResult:
        """The loss of 0-based step ``step`` (with gradients) on this process's batch (``rank`` of ``world``).
        For an ``accelerated`` objective ``model`` may be wrapped for distributed training: call it, do not read
        its attributes (keep what you need from :meth:`setup`)."""

    def parameter_groups(self, model: nn.Module, grown: list[str]) -> list[dict]:
        """AdamW's parameter groups, given the names of the parameters the drafter was grown by (kept in the
        checkpoint, so a resumed run groups as it started). A group's ``lr_scale`` scales the schedule's rate for
        it. Default: one group."""
        return [{"params": list(model.parameters())}]

    def precision(self) -> contextlib.AbstractContextManager:
        """The context every :meth:`step` runs in (e.g. bf16 autocast); default: full precision."""
        return contextlib.nullcontext()

    @abstractmethod
    def train_record(self, result: StepResult, progress: Progress) -> dict:
        """The ``log.jsonl`` record of a step."""

    @abstractmethod
    def evaluate(self, model: nn.Module) -> dict | None:
        """Held-out metrics (the model is in eval mode; acc@1..d among them), or None when there is nothing to
        evaluate on."""

    def eval_record(self, entry: dict) -> dict:
        """The ``log.jsonl`` record of an evaluation ``{"step": s, **metrics}``."""
        return {"eval": entry}

    def session(self) -> dict:
        """What this start of the run trains on, for the session list of state.pt and the recipe."""
        return {}

    @abstractmethod
    def describe(self, model: nn.Module) -> str:
        """One line for the log: what is trained, on how much data."""

    @abstractmethod
    def recipe(self, model: nn.Module, run: RunSummary) -> dict:
        """``drafter/recipe.json``: how the final drafter was made."""


def command_line() -> str:
    """The falconspec command this process runs, as typed."""
    return " ".join(["falconspec"] + sys.argv[1:])


def moving_average(model: nn.Module, decay: float, state: dict) -> AveragedModel | None:
    """The exponential moving average of ``model``'s weights (None when ``decay`` is 0): restored from a checkpoint's
    ``state``, else started at the weights as they are now."""
    if decay == 0:
        return None
    if not 0 < decay < 1:
        raise ValueError(f"--ema-decay must be in [0, 1), got {decay}")
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))
    if "ema" in state:
        ema.load_state_dict(state["ema"])
    else:
        if state:
            log.warning("the checkpoint kept no moving average: it starts at the resumed weights")
        ema.update_parameters(model)  # the first update copies the weights
    return ema


@functools.cache
def _malloc_trim():
    """glibc's ``malloc_trim``, or None where the C library has none (musl, macOS, Windows)."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c")), "malloc_trim", None)
    except OSError:
        return None


def release_freed_memory() -> bool:
    """Hand memory the allocator keeps after tensors are freed back to the system. Training steps allocate
    differently sized batches and glibc keeps the freed heap: the processes of a two-process CPU run grew from 1 GB
    to 7 GB, most of it freed memory (recipes/README.md, round 16: one ``malloc_trim`` took a process from 3.3 GB to
    2.1 GB). True if memory was returned."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False


def train(objective: Objective) -> Path | None:
    """Train (or resume) ``objective``'s drafter; returns the final drafter directory (on the main process)."""
    from accelerate import Accelerator

    cfg = objective.config
    acc = Accelerator(cpu=not (objective.accelerated and torch.cuda.is_available()))
    world, rank = acc.num_processes, acc.process_index
    if world > 1 and not objective.accelerated:
        raise ValueError(f"the {objective.name} objective trains in one process, not {world}")
    out = Path(cfg.out)
    checkpoint = out / CHECKPOINT_DIR
    resuming = (checkpoint / STATE_FILE).exists()
    model = objective.setup(acc.device, checkpoint if resuming else None)
    state = torch.load(checkpoint / STATE_FILE, weights_only=False) if resuming else {}
    model.train()
    grown = state.get("grown", []) if state else list(objective.grown)
    optimizer = torch.optim.AdamW(objective.parameter_groups(model, grown), lr=cfg.lr, betas=(0.9, 0.95),
                                  weight_decay=cfg.weight_decay)
    step = state.get("step", 0)
    if state:
        if len(state["optimizer"]["param_groups"]) != len(optimizer.param_groups):
            raise ValueError(f"{checkpoint} trained {len(state['optimizer']['param_groups'])} parameter group(s), "
                             f"these settings make {len(optimizer.param_groups)}: resume with the same --grown-lr")
        optimizer.load_state_dict(state["optimizer"])
        log.info("resuming from step %d", step)
    history = state.get("history", [])
    sessions = state.get("sessions", []) + [
        {"start_step": step, "command": command_line(), **objective.session(), "max_steps": cfg.max_steps}]
    model, optimizer = acc.prepare(model, optimizer)
    raw = acc.unwrap_model(model)
    ema = moving_average(raw, cfg.ema_decay, state) if acc.is_main_process else None
    kept = ema.module if ema is not None else raw  # the weights evaluated into the history and saved as the drafter
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        log.info("training %s, %d process(es)%s", objective.describe(raw), world,
                 f", EMA of the weights (decay {cfg.ema_decay})" if ema is not None else "")

    def scored(module: nn.Module) -> dict | None:  # held-out metrics of a module, in eval mode
        module.eval()
        metrics = objective.evaluate(module)
        module.train()
        return metrics

    def evaluate() -> None:  # on the main process: one evaluation into history and the log
        if ema is not None and (trained := scored(raw)) is not None:
            log_record(out, {"eval_trained": {"step": step, **trained}})
        metrics = scored(kept)
        if metrics is not None:
            history.append({"step": step, **metrics})
            log_record(out, objective.eval_record(history[-1]))

    started, tokens = time.time(), 0
    while step < cfg.max_steps:
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        with objective.precision():
            result = objective.step(model, step, rank, world)
        acc.backward(result.loss)
        grad_norm = float(acc.clip_grad_norm_(model.parameters(), cfg.grad_clip)) if cfg.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            ema.update_parameters(raw)
        step += 1
        tokens += result.tokens
        if step % cfg.log_every == 0:
            release_freed_memory()
        if acc.is_main_process and (step % cfg.log_every == 0 or step == 1):
            progress = Progress(step, lr, grad_norm, time.time() - started, tokens)
            log_record(out, objective.train_record(result, progress))
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            if acc.is_main_process:
                evaluate()
            acc.wait_for_everyone()
        if step % cfg.save_every == 0 or step == cfg.max_steps:
            if acc.is_main_process:
                save_checkpoint(checkpoint, raw, {"optimizer": optimizer.state_dict(), "step": step, "grown": grown,
                                                  "history": history, "sessions": sessions, "config": asdict(cfg),
                                                  **({"ema": ema.state_dict()} if ema is not None else {})})
            acc.wait_for_everyone()
    final = None
    if acc.is_main_process:
        if not history or history[-1]["step"] != step:  # resumed at the end of a run that kept no evaluation
            evaluate()
        kept.eval()
        final = out / FINAL_DIR
        kept.save_pretrained(final)
        recipe = objective.recipe(kept, RunSummary(step, history, sessions, world))
        (final / RECIPE_FILE).write_text(json.dumps(recipe, indent=1) + "\n")
    acc.wait_for_everyone()
    # Free the prepared (DDP) model while the process group is still registered. Otherwise its reducer is the group's
    # last owner after end_training(), and frees it with the GIL held when this frame is cleared: gloo's destructor
    # then joins a worker thread that waits for the GIL to finish the last barrier's work, and the process hangs.
    model, optimizer = acc.free_memory(model, optimizer)
    acc.end_training()
    return final
