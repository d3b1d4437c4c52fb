"""Measure the machine: what a verification forward and a drafter pass cost here, cached per machine fingerprint.

Speed-ups depend on the cost curve c(n) of one target forward over n tree nodes, and that curve differs between
CPUs, BLAS builds, thread counts, dtypes and GPUs (``kernels.py`` has two machines where the best product path
for the same forward is opposite). So nothing here is assumed; everything is timed on the real model:

* **verification cost**: c(n) for every product path of :mod:`.kernels` (stock ``F.linear`` and, for float32 on
  CPU, the few-row and oneDNN paths), interleaved round by round so drift hits all alike; per n the fastest is kept;
* **per drafter**: the seconds one cycle spends drafting D levels deep (its update included), and how often its
  candidates are accepted per (depth, rank): the planner's prior (:mod:`.planner`), from short generations on
  built-in prompts with a generous fixed tree whose depth rotates through the timed depths cycle by cycle (one
  generation measures every depth).

Results are cached as JSON in ``$FALCONSPEC_CALIBRATION_DIR`` (default ``<cache dir>/calibration``), one file per
fingerprint (CPU model and flags or GPU name, torch version and BLAS, threads, dtype, device, a hash of the model's
weights); within it, per drafter (its weights and the drafting code's version: an upgrade that changes what drafting
costs measures it again). ``FALCONSPEC_CALIBRATION=FILE`` uses a given file instead, ``FALCONSPEC_RECALIBRATE=1``
measures again.
The quick form (run automatically the first time a target and drafter meet) takes seconds; ``falconspec calibrate``
runs the full form.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from .kernels import ONEDNN, STOCK, available_paths, forget_reordered
from .planner import AcceptanceProfile, BudgetPlanner, Plan, interpolate

log = logging.getLogger(__name__)

# 2: the few-row path is timed at one node too (a plain step), drafters on three prompts; a format-1 file (and so
# every drafter prior it holds from a single prompt) is measured again
# 3: the oneDNN path is timed too; an older file, which never tried it, is measured again
FORMAT = 3
MIN_PRIOR_TRIALS = 12  # calibration trials a (depth, rank) cell needs to set the planner's prior
CPU_FLAGS = ("avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16",
             "amx_int8", "neon", "asimd", "sve")


@dataclass(frozen=True)
class Effort:
    """How much to measure: the quick form runs automatically, the full one with ``falconspec calibrate``."""

    name: str
    sizes: tuple[int, ...]  # tree sizes timed
    rounds: int  # timed rounds per size and path (after one warm-up forward per path)
    prefix: int  # cached tokens under the timed forwards
    depths: tuple[int, ...]  # drafting depths timed per drafter
    prompts: int  # calibration prompts (each one generation sweeping every depth)
    tokens: int  # new tokens per calibration prompt
    tree: int  # nodes of the fixed tree in drafter calibration runs


# the acceptance prior needs a few dozen trials per cell: one 32-token prompt gave a k=2 drafter 15 at its first
# level, and a prior whose second candidate looked better than its first (MT-bench said 0.12 against 0.30)
QUICK = Effort("quick", (1, 2, 4, 8, 16), 2, 128, (1, 2, 4), 3, 32, 12)
FULL = Effort("full", (1, 2, 3, 4, 6, 8, 12, 16, 24, 32), 4, 256, (1, 2, 3, 4, 6), 3, 64, 12)

PROMPTS = ("Explain how a hash map works, with a short example in Python.",
           "Write a short story about a lighthouse keeper who finds a message in a bottle.",
           "List five tips for staying productive when working from home, and explain each one.")


# ---------------------------------------------------------------------------------------------- fingerprints
def fingerprint(target) -> dict:
    """What the costs depend on: device, processor, math library, threads, dtype and the model's weights."""
    device = target.device
    info = {"device": device.type, "dtype": str(target.dtype).replace("torch.", ""), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "blas": _blas(), "model": model_hash(target.model)}
    if device.type == "cuda":
        info["processor"] = torch.cuda.get_device_name(device)
    else:
        info["processor"], info["cpu_flags"] = cpu_info()
    return info


def fingerprint_id(info: dict) -> str:
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


def model_hash(module: nn.Module, sample: int = 4096) -> str:
    """A fast identity of a module's weights: names, shapes, dtypes and an evenly strided sample of each tensor's
    values (hashing every byte of a 7B model would take minutes; costs depend on shapes, the prior on values)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // sample)
        values = flat[::step][:sample].to("cpu", torch.float32).numpy().tobytes()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(values)
    return digest.hexdigest()[:16]


def cpu_info() -> tuple[str, list[str]]:
    """The CPU's model name and the instruction-set flags of :data:`CPU_FLAGS` it has."""
    name, flags = platform.processor() or platform.machine(), set()
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        if match := re.search(r"^model name\s*:\s*(.+)$", text, re.M):
            name = match.group(1).strip()
        if match := re.search(r"^(?:flags|Features)\s*:\s*(.+)$", text, re.M):
            flags = set(match.group(1).split())
    except OSError:
        pass
    return name, sorted(f for f in CPU_FLAGS if f in flags)


def _blas() -> str:
    config = torch.__config__.show()
    match = re.search(r"BLAS_INFO=(\w+)", config)
    return (match.group(1) if match else "unknown") + ("+mkldnn" if torch.backends.mkldnn.is_available() else "")


def busy() -> bool:
    """Does other work load the CPU? (1-minute load average beyond this process's threads and half the cores)"""
    cores = os.cpu_count() or 1
    return os.getloadavg()[0] - torch.get_num_threads() >= 0.5 * cores + 0.5


# ---------------------------------------------------------------------------------------------- the cache
def calibration_dir() -> Path:
    if env := os.environ.get("FALCONSPEC_CALIBRATION_DIR"):
        return Path(env)
    from .models import cache_dir

    return cache_dir() / "calibration"


class Calibration:
    """The measured costs of one target on one machine, and of the drafters calibrated with it."""

    def __init__(self, data: dict, path: Path | None = None):
        if data.get("format") != FORMAT:
            raise ValueError(f"calibration file {path} has format {data.get('format')!r}, this falconspec reads "
                             f"{FORMAT}: recalibrate (falconspec calibrate, or FALCONSPEC_RECALIBRATE=1)")
        self.data, self.path = data, path

    @classmethod
    def for_target(cls, target, effort: Effort = QUICK, recalibrate: bool | None = None) -> Calibration:
        """The cached calibration of ``target`` on this machine; measured (``effort``) when missing."""
        if explicit := os.environ.get("FALCONSPEC_CALIBRATION"):
            path = Path(explicit)
            if not path.is_file():
                raise FileNotFoundError(f"FALCONSPEC_CALIBRATION={explicit}: no such file")
            return cls(json.loads(path.read_text()), path)
        if recalibrate is None:
            recalibrate = os.environ.get("FALCONSPEC_RECALIBRATE", "") not in ("", "0")
        info = fingerprint(target)
        path = calibration_dir() / f"{fingerprint_id(info)}.json"
        if path.is_file() and not recalibrate:
            try:
                calibration = cls(json.loads(path.read_text()), path)
                if calibration.measured_on_busy_machine() and not busy():
                    log.warning("%s was measured while other work loaded the CPU: measuring again", path)
                elif effort is QUICK or calibration.data["verify"]["effort"] == effort.name:
                    return calibration
            except (ValueError, KeyError) as err:
                log.warning("ignoring unreadable calibration %s: %s", path, err)
        log.info("calibrating %s on this machine (%s form, once)", target.name, effort.name)
        calibration = cls({"format": FORMAT, "fingerprint": info, "verify": measure_verify_cost(target, effort),
                           "drafters": {}}, path)
        calibration.save()
        return calibration

    def measured_on_busy_machine(self) -> bool:
        return bool(self.data["verify"].get("busy"))

    def save(self) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.data, indent=1))
        os.replace(tmp, self.path)  # atomic: a concurrent reader sees the old or the new file

    # ---------------------------------------------------------------- verification
    @property
    def sizes(self) -> list[int]:
        return list(self.data["verify"]["sizes"])

    def chosen_paths(self, force: str | None = None) -> dict[int, str]:
        """Per tree size, the product path to use: the measured fastest, or ``force`` (a measured path's name)."""
        paths = self.data["verify"]["seconds"]
        if force not in (None, "auto"):
            if force not in paths:
                raise ValueError(f"matmul path {force!r} was not measured here (measured: {sorted(paths)})")
            return {n: force for n in self.sizes}
        return {n: min(paths, key=lambda p: paths[p][i]) for i, n in enumerate(self.sizes)}

    def verify_curve(self, force: str | None = None) -> list[float]:
        """Seconds per forward over each of :attr:`sizes` nodes with the chosen paths (n = 1: a plain step)."""
        chosen, paths = self.chosen_paths(force), self.data["verify"]["seconds"]
        return [paths[chosen[n]][i] for i, n in enumerate(self.sizes)]

    # ---------------------------------------------------------------- drafters
    def drafter_entry(self, target, drafter, effort: Effort = QUICK) -> dict:
        """The calibration of ``drafter`` with this target; measured and saved when missing."""
        key = drafter_key(drafter)
        entry = self.data["drafters"].get(key)
        if entry is None or (effort is FULL and entry.get("effort") != FULL.name):
            log.info("calibrating the %s drafter (%s form, once)", drafter.name, effort.name)
            entry = measure_drafter(target, drafter, effort)
            self.data["drafters"][key] = entry
            self.save()
        return entry

    def verify_cost(self, force_path: str | None = None, batch_size: int = 1) -> Callable[[int], float]:
        """Seconds of one sequence's share of a verification forward over ``n`` nodes: c(n) from the measured curve,
        or, in a batch of ``batch_size`` sequences each verifying ``n`` nodes, c(batch_size * n) / batch_size (the
        forward runs every row of the batch; the sequences share its time)."""
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        curve = interpolate(self.sizes, self.verify_curve(force_path))
        return curve if batch_size == 1 else lambda n: curve(batch_size * n) / batch_size

    def apply_paths(self, target, force_path: str | None = None) -> None:
        """Make ``target``'s few-row forwards (verification and drafting) take the measured fastest product paths,
        or ``force_path``. A policy without the oneDNN path frees the weight copies an earlier one made."""
        chosen = self.chosen_paths(force_path)
        target.matmul_policy.set(chosen)
        if ONEDNN not in chosen.values():
            forget_reordered(target.model)

    def planner(self, target, drafter, force_path: str | None = None, batch_size: int = 1) -> BudgetPlanner:
        """A planner for ``drafter`` on this machine; also applies the product paths to the target. ``batch_size``:
        the planner of one sequence in a batch of that many (see :meth:`verify_cost`)."""
        self.apply_paths(target, force_path)
        entry = self.drafter_entry(target, drafter)
        hits, trials = np.asarray(entry["hits"]), np.asarray(entry["trials"])
        # a cell calibration saw too little of is left open (NaN): the planner borrows it from the cells above
        prior = np.where(trials >= MIN_PRIOR_TRIALS, (hits + 0.5) / np.maximum(trials + 1.0, 1.0), np.nan)
        depths = entry["depths"]
        sizes = [n for n in (drafter.plan_sizes() or self.sizes) if n <= 2 * max(self.sizes)]  # little extrapolation
        return BudgetPlanner(verify_cost=self.verify_cost(force_path, batch_size),
                             draft_cost=interpolate(depths, entry["draft_seconds"]),
                             profile=AcceptanceProfile(prior), sizes=sizes, max_depth=drafter.max_planned_depth,
                             probe=drafter.cheap_to_follow)

    def describe(self, force_path: str | None = None) -> str:
        """Fingerprint and cost curve, for ``--explain`` and ``falconspec calibrate``."""
        info = self.data["fingerprint"]
        lines = [f"machine: {info.get('processor')} ({info['device']}, {info['threads']} threads, {info['blas']}, "
                 f"torch {info['torch']}, {info['dtype']}; flags {' '.join(info.get('cpu_flags', [])) or '-'})",
                 f"calibration: {self.path} ({self.data['verify']['effort']} form"
                 + (", measured on a busy machine" if self.measured_on_busy_machine() else "") + ")",
                 "verification cost, ms per forward over n nodes (ratio to a stock one-node step; * = path used):"]
        chosen, paths = self.chosen_paths(force_path), self.data["verify"]["seconds"]
        one = paths[STOCK][0]
        lines.append("  n      " + "".join(f"{n:>8}" for n in self.sizes))
        for path, seconds in paths.items():
            cells = "".join(f"{s * 1e3:7.1f}{'*' if chosen[n] == path else ' '}"
                            for n, s in zip(self.sizes, seconds))
            lines.append(f"  {path:<7}{cells}")
            lines.append("  ratio  " + "".join(f"{s / one:7.2f} " for s in seconds))
        return "\n".join(lines)


def for_generation(target, drafter, planner, matmul_path: str | None) -> Calibration | None:
    """What a generator over ``target`` and ``drafter`` takes from this machine's calibration when its ``planner``
    is ``"auto"``: the product paths of its few-row forwards, applied to ``target`` for every drafter and for plain
    decoding (a fixed budget's tree verifies on the measured paths too, and a plain step takes the faster one-row
    path, whatever ran on the target before), and the calibration itself, which a planned drafter plans from. None
    (nothing measured, nothing applied) for another ``planner``."""
    if not (isinstance(planner, str) and planner == "auto"):
        return None
    calibration = Calibration.for_target(target)
    calibration.apply_paths(target, matmul_path)
    return calibration


def drafter_key(drafter) -> str:
    """A drafter's identity in the cache: its class, name, the drafting code (:func:`drafting_code_hash`: a new
    version of it may cost differently, so it is measured again) and, for trained drafters, a hash of its weights."""
    key = f"{type(drafter).__name__}:{drafter.name}:code-{drafting_code_hash()}"
    model = getattr(drafter, "model", None)
    return key + (f":{model_hash(model)}" if isinstance(model, nn.Module) else "")


@functools.cache
def drafting_code_hash() -> str:
    """A short hash of the sources of :mod:`falconspec.drafters` and :mod:`falconspec.kernels`, which decide what a
    drafting pass costs; read once per process (every planner asks for it)."""
    from . import drafters, kernels

    digest = hashlib.sha256()
    files = sorted(Path(drafters.__file__).parent.glob("*.py")) + [Path(kernels.__file__)]
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


# ---------------------------------------------------------------------------------------------- measuring
@torch.no_grad()
def measure_verify_cost(target, effort: Effort = QUICK) -> dict:
    """Median seconds of one target forward over n chain nodes on a cached prefix, per product path."""
    from .tree import Tree

    paths = available_paths(target.device, target.dtype, target.model)
    generator = torch.Generator().manual_seed(0)
    low, high = min(100, target.vocab_size // 4), max(target.vocab_size - 100, target.vocab_size * 3 // 4)
    prefix_len = min(effort.prefix, target.max_context - max(effort.sizes) - 2)
    prefix = torch.randint(low, high, (prefix_len + max(effort.sizes),), generator=generator)
    saved = dict(target.matmul_policy.paths)
    times: dict[str, dict[int, list[float]]] = {p: {n: [] for n in effort.sizes} for p in paths}
    cache = target.new_cache()  # its own: a calibration never disturbs a generation on the same target
    try:
        target.prefill(prefix[:prefix_len], cache=cache)
        # one warm-up forward per path (the largest: it allocates the most), then rounds interleaving sizes and paths
        for round_index, sizes in enumerate([effort.sizes[-1:]] + [effort.sizes] * effort.rounds):
            for n in sizes:
                tree = Tree.chain(int(prefix[prefix_len]), prefix[prefix_len + 1:prefix_len + n].tolist())
                for path in paths:
                    target.matmul_policy.set({size: path for size in effort.sizes})
                    start = time.perf_counter()
                    target.forward_tree(tree, cache=cache)
                    if target.device.type == "cuda":
                        torch.cuda.synchronize(target.device)
                    elapsed = time.perf_counter() - start
                    target.compact([], n, cache=cache)
                    if round_index:
                        times[path][n].append(elapsed)
    finally:
        target.matmul_policy.set(saved)
        forget_reordered(target.model)  # timing made oneDNN copies of every weight; the paths chosen remake theirs
    return {"effort": effort.name, "prefix": prefix_len, "rounds": effort.rounds, "sizes": list(effort.sizes),
            "load_average": os.getloadavg()[0], "busy": busy(),
            "seconds": {p: [statistics.median(times[p][n]) for n in effort.sizes] for p in paths}}


class DepthSweep(BudgetPlanner):
    """Calibration's schedule in place of a planner: a fixed ``tree``-node tree whose depth rotates through
    ``depths`` cycle by cycle, so one generation times every depth and counts acceptances at all of them."""

    def __init__(self, depths: list[int], tree: int):
        super().__init__(verify_cost=lambda n: 1.0, draft_cost=lambda d: 0.0, profile=AcceptanceProfile(),
                         sizes=[tree], max_depth=max(depths))
        self.depths, self.tree = depths, tree
        self.cycle_depths: list[int] = []  # the planned depth of every cycle so far

    def _plan(self) -> Plan:
        depth = self.depths[len(self.cycle_depths) % len(self.depths)]
        return Plan(max(self.tree, depth + 1), depth, 1.0, 1.0)

    def start(self) -> Plan:
        self.history, self.fell_back, self._current = [], False, self._plan()
        return self._current

    def observe(self, tree, accepted_path) -> Plan:
        self.cycle_depths.append(self._current.depth)
        self._current = self._plan()
        return self._current

    def cycle_budget(self, plan: Plan) -> Plan:
        return plan  # the sweep's own depth: no probing, no exploring


def measure_drafter(target, drafter, effort: Effort = QUICK) -> dict:
    """Draft cost per depth and acceptance counts per (depth, rank), from short generations with a fixed tree
    whose depth rotates through ``effort.depths`` (:class:`DepthSweep`)."""
    from .generate import SpeculativeGenerator

    depths = [d for d in effort.depths if d <= drafter.max_planned_depth] or [drafter.max_planned_depth]
    counts = AcceptanceProfile()  # only its hit and trial counts are used
    cycle_seconds: dict[int, list[float]] = {d: [] for d in depths}
    generator = SpeculativeGenerator(target, drafter, planner=None)
    generator.listeners.append(counts.observe)
    for prompt in PROMPTS[:effort.prompts]:
        generator.planner = sweep = DepthSweep(depths, effort.tree)  # used whether or not the drafter is planned
        request = ({"messages": [{"role": "user", "content": prompt}]}
                   if getattr(target.tokenizer, "chat_template", None) else {"prompt": prompt})
        out = generator.generate(**request, max_new_tokens=effort.tokens, ignore_eos=True)
        # the first cycle's drafting has no drafter update before it: a different cost, left out
        for depth, seconds in list(zip(sweep.cycle_depths, out.stats.cycle_draft_seconds))[1:]:
            cycle_seconds[depth].append(seconds)
    seconds = [statistics.median(cycle_seconds[d]) if cycle_seconds[d] else math.nan for d in depths]
    if any(math.isnan(s) for s in seconds):  # a generation too short to reach every depth: borrow the nearest
        measured = [(d, s) for d, s in zip(depths, seconds) if not math.isnan(s)]
        seconds = [s if not math.isnan(s) else min(measured, key=lambda m: abs(m[0] - d))[1]
                   for d, s in zip(depths, seconds)] if measured else [0.0] * len(depths)
    return {"effort": effort.name, "name": drafter.name, "depths": depths, "draft_seconds": seconds,
            "tree": effort.tree, "prompts": effort.prompts, "tokens": effort.tokens,
            "hits": counts.hits.tolist(), "trials": counts.trials.tolist()}
