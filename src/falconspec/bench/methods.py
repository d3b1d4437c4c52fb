"""The decoding methods a benchmark compares, behind one interface: token ids in, a :class:`TurnResult` out.

* ``greedy``: plain decoding in our engine (``SpeculativeGenerator`` without a drafter), the speed-up baseline;
* every drafter kind of :mod:`..drafters.registry` but ``none``: ``pld``, our prompt-lookup drafter;
  ``falcon``/``eagle``/``eagle3``/``medusa``, trained drafter checkpoints, run in the target's dtype (default: the
  ones shipped for a built-in model); ``lookahead``, lookahead decoding (a Jacobi window and an n-gram pool, no
  training);
* ``hf``, ``hf-pld``, ``hf-assisted``: Hugging Face ``generate`` plain, with prompt lookup, and with an assistant
  model (a copy of the target's first layers sharing its weights, or a small model given by path);
* ``llamacpp``, ``llamacpp-ngram``, ``llamacpp-eagle3``: llama.cpp on the target's GGUF file, plain, with its
  n-gram speculation and with an EAGLE-3 draft GGUF (:mod:`.llamacpp`).

Each method is compared (speed-up, identical answers) with ``greedy``, except where :data:`COMPARED_WITH` names
another method: llama.cpp's speculative methods are compared with llama.cpp's own plain decoding.

Every method returns the same token accounting: the new tokens after the prompt, cut before the first EOS token
(which is not counted) and at ``max_new_tokens``. A method that cannot run becomes a :class:`Skipped` with its reason.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..drafters import make_drafter, shipped_drafter_dir
from ..drafters.registry import KINDS, MODEL_FREE_NAMES, TRAINED_NAMES
from ..generate import SpeculativeGenerator
from ..target import TargetModel
from .datasets import display_path

log = logging.getLogger(__name__)

BASELINE = "greedy"
# our engine: the baseline, then every drafter kind of the registry (drafters.registry) but "none"
ENGINE_METHODS = (BASELINE,) + tuple(kind.name for kind in KINDS if kind.name != "none")
HF_METHODS = ("hf", "hf-pld", "hf-assisted")
LLAMACPP_METHODS = ("llamacpp", "llamacpp-ngram", "llamacpp-eagle3")
METHOD_NAMES = ENGINE_METHODS[:2] + HF_METHODS + ENGINE_METHODS[2:] + LLAMACPP_METHODS
CHECKPOINT_METHODS = TRAINED_NAMES  # need a trained drafter directory
# The method a method's speed and answers are compared with, where it is not the baseline greedy. llama.cpp computes
# with its quantized weights times 8-bit activations, so only its own plain decoding is expected to give the same
# tokens as its speculative methods; llama.cpp's plain decoding itself is compared with our greedy.
COMPARED_WITH = {"llamacpp": BASELINE, "llamacpp-ngram": "llamacpp", "llamacpp-eagle3": "llamacpp"}


def baseline_of(name: str) -> str:
    """The method ``name`` is compared with: its speed-up is over that method, its answers must equal that method's."""
    return COMPARED_WITH.get(name, BASELINE)


@dataclass
class TurnResult:
    """One generation (one turn of one prompt) by one method."""

    token_ids: list[int]  # new tokens, EOS excluded, at most max_new_tokens
    text: str
    wall_time: float  # seconds around the whole call (prefill included)
    accept_lengths: list[int]  # per verification forward: committed tokens, bonus included (1 = no draft accepted)
    finish_reason: str  # "stop" (EOS) or "length"
    seed: int | None = None
    drafted_tokens: int | None = None  # None: the method does not expose it (Hugging Face methods)
    accepted_tokens: int | None = None
    draft_time: float | None = None  # seconds spent drafting (our engine only)
    verify_time: float | None = None  # seconds in target forwards over drafts, verification and cache compaction
    prefill_time: float | None = None
    plan_cycles: dict[str, int] | None = None  # our engine: cycles per planned budget ("4n/d2", "plain", "fixed")


@dataclass(frozen=True)
class Skipped:
    method: str
    reason: str


@dataclass(frozen=True)
class MethodOptions:
    drafter_dirs: dict[str, str] = field(default_factory=dict)  # trained drafter kind -> checkpoint dir
    assistant: str = "6"  # hf-assisted: number of target layers to keep, or an assistant model directory
    prompt_lookup_tokens: int = 10  # hf-pld: prompt_lookup_num_tokens
    matmul_path: str = "auto"  # our drafters: few-row product path per row count, measured (auto) or forced
    num_nodes: int | None = None  # our drafters: a fixed tree budget instead of the planner's
    depth: int | None = None
    llamacpp_draft: str | None = None  # llamacpp-eagle3: the EAGLE-3 draft GGUF file

    def __post_init__(self) -> None:
        if self.matmul_path not in ("auto", "stock", "few-row"):
            raise ValueError(f"matmul path must be auto, stock or few-row, got {self.matmul_path!r}")
        if self.prompt_lookup_tokens < 1:
            raise ValueError(f"prompt lookup needs >= 1 draft tokens, got {self.prompt_lookup_tokens}")
        if not self.assistant:
            raise ValueError("--assistant needs a layer count or a model directory")
        unknown = set(self.drafter_dirs) - set(CHECKPOINT_METHODS)
        if unknown:
            raise ValueError(f"drafter directories are for {CHECKPOINT_METHODS}, got {sorted(unknown)}")


class Method(ABC):
    name: str

    @abstractmethod
    def generate(self, input_ids: list[int], max_new_tokens: int, temperature: float, seed: int | None) -> TurnResult:
        """Continue ``input_ids`` [L]; greedy when ``temperature == 0``, else seeded sampling."""

    def num_parameters(self) -> int:
        """Parameters of the drafter or draft model (0 for model-free methods)."""
        return 0

    def drafter_source(self) -> dict | None:
        """Which trained drafter ran (checkpoint directory and weights hash), for checkpoint methods."""
        return None


class EngineMethod(Method):
    def __init__(self, name: str, target: TargetModel, drafter=None, checkpoint: Path | None = None,
                 matmul_path: str = "auto"):
        self.name = name
        self.generator = SpeculativeGenerator(target, drafter, matmul_path=matmul_path)
        self._source = None if checkpoint is None else _checkpoint_source(checkpoint)  # hashed once, not per setting

    def generate(self, input_ids, max_new_tokens, temperature, seed):
        start = time.perf_counter()
        out = self.generator.generate(input_ids=input_ids, max_new_tokens=max_new_tokens, temperature=temperature,
                                      seed=seed)
        wall = time.perf_counter() - start
        stats = out.stats
        return TurnResult(out.token_ids, out.text, wall, [a + 1 for a in stats.accepted_per_cycle],
                          out.finish_reason, seed, stats.drafted_tokens, stats.accepted_tokens, stats.draft_time,
                          stats.verify_time, stats.prefill_time, stats.plan_cycles())

    def num_parameters(self) -> int:
        return self.generator.drafter.num_parameters()

    def drafter_source(self) -> dict | None:
        return self._source


def _checkpoint_source(checkpoint: Path) -> dict:
    weights = checkpoint / "model.safetensors"
    digest = hashlib.sha256(weights.read_bytes()).hexdigest() if weights.is_file() else None
    return {"path": display_path(checkpoint), "weights_sha256": digest}


class _StepRecorder:
    """A ``generate`` streamer that records how many tokens each target forward commits."""

    def __init__(self):
        self.sizes: list[int] = []
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if self.prompt_seen:
            self.sizes.append(int(value.numel()))
        self.prompt_seen = True  # generate streams the prompt first

    def end(self) -> None:
        pass


# generation-config fields a model may set that would change what greedy or sampling means: pinned to neutral
NEUTRAL = {"repetition_penalty": 1.0, "no_repeat_ngram_size": 0, "min_length": 0, "typical_p": 1.0,
           "min_p": 0.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0}


class HFMethod(Method):
    """``model.generate`` on the target's own Hugging Face model, with extra generate arguments (drafting)."""

    def __init__(self, name: str, target: TargetModel, extra: dict | None = None, draft_model=None):
        self.name, self.target, self.extra, self.draft_model = name, target, dict(extra or {}), draft_model
        if draft_model is not None:
            self.extra["assistant_model"] = draft_model
        config = target.model.generation_config
        self.neutral = {k: v for k, v in NEUTRAL.items() if getattr(config, k, None) not in (None, v)}
        pad = target.tokenizer.pad_token_id
        self.eos = sorted(target.eos_token_ids)
        self.pad = pad if pad is not None else self.eos[0]

    def generate(self, input_ids, max_new_tokens, temperature, seed):
        model = self.target.model
        ids = torch.tensor([input_ids], dtype=torch.long, device=model.device)  # [1, L]
        recorder = _StepRecorder()
        kwargs = {"attention_mask": torch.ones_like(ids), "max_new_tokens": max_new_tokens, "eos_token_id": self.eos,
                  "pad_token_id": self.pad, "streamer": recorder, "do_sample": temperature > 0, **self.neutral,
                  **self.extra}
        if temperature > 0:
            kwargs.update(temperature=temperature, top_k=0, top_p=1.0)
            torch.manual_seed(seed)  # HF samples from the global generator
        start = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(ids, **kwargs)
        wall = time.perf_counter() - start
        new = out[0, len(input_ids):].tolist()
        eos = set(self.eos)
        cut = next((i for i, t in enumerate(new) if t in eos), len(new))  # EOS ends the answer, uncounted
        tokens = new[:min(cut, max_new_tokens)]
        text = self.target.tokenizer.decode(tokens, skip_special_tokens=True)
        reason = "stop" if cut < len(new) and cut <= max_new_tokens else "length"
        return TurnResult(tokens, text, wall, recorder.sizes, reason, seed)

    def num_parameters(self) -> int:
        if self.draft_model is None:
            return 0
        unique = {p.data_ptr(): p.numel() for p in self.draft_model.parameters()}  # tied weights count once
        return sum(unique.values())


# ---------------------------------------------------------------------------------------------- building
def split_budget(name: str) -> tuple[str, int | None]:
    """``falcon@4`` -> (``falcon``, 4): one of our drafters with a fixed tree of 4 nodes instead of the planner's."""
    base, _, nodes = name.partition("@")
    if not nodes:
        return base, None
    if base not in ENGINE_METHODS[1:] or not nodes.isdigit() or int(nodes) < 2:
        raise ValueError(f"{name!r}: a fixed budget is DRAFTER@NODES for one of {', '.join(ENGINE_METHODS[1:])} "
                         "with NODES >= 2")
    return base, int(nodes)


def expand_method_names(names: list[str]) -> list[str]:
    """Validate names (``all`` = every method; ``falcon@4`` = falcon with a fixed 4-node tree); the baseline
    ``greedy`` is always included, first, and the method another is compared with (``COMPARED_WITH``) before it."""
    out: list[str] = []
    for name in names:
        for n in (METHOD_NAMES if name == "all" else [name]):
            if split_budget(n)[0] not in METHOD_NAMES:
                raise ValueError(f"unknown method {n!r}: choose from all, {', '.join(METHOD_NAMES)} (a drafter may "
                                 "take a fixed tree size, e.g. falcon@4)")
            if baseline_of(n) not in out:
                out.append(baseline_of(n))
            if n not in out:
                out.append(n)
    return [BASELINE] + [n for n in out if n != BASELINE]


def build_methods(names: list[str], target: TargetModel, model: str,
                  options: MethodOptions) -> tuple[list[Method], list[Skipped]]:
    methods, skipped = [], []
    for name in expand_method_names(names):
        try:
            methods.append(_build(name, target, model, options))
        except _Unavailable as why:
            skipped.append(Skipped(name, str(why)))
    return methods, skipped


class _Unavailable(Exception):
    """A method cannot run in this setup; the message says why and what would enable it."""


def _build(name: str, target: TargetModel, model: str, options: MethodOptions) -> Method:
    kind, fixed_nodes = split_budget(name)
    if fixed_nodes is not None:
        options = dataclasses.replace(options, num_nodes=fixed_nodes)
        method = _build(kind, target, model, options)
        method.name = name
        return method
    if name == "greedy":
        return EngineMethod(name, target)
    budget = {k: v for k, v in (("num_nodes", options.num_nodes), ("depth", options.depth)) if v is not None}
    if name in MODEL_FREE_NAMES:  # model-free drafters
        return EngineMethod(name, target, make_drafter(name, target, **budget), matmul_path=options.matmul_path)
    if name == "hf":
        return HFMethod(name, target)
    if name == "hf-pld":
        return HFMethod(name, target, {"prompt_lookup_num_tokens": options.prompt_lookup_tokens})
    if name == "hf-assisted":
        return HFMethod(name, target, draft_model=_assistant(target, options.assistant))
    if name in LLAMACPP_METHODS:
        from .llamacpp import build_llamacpp_method

        return build_llamacpp_method(name, target, model, options)
    path = Path(options.drafter_dirs.get(name) or shipped_drafter_dir(model, name))
    if not path.is_dir():
        raise _Unavailable(f"no trained {name} drafter at {path}: pass --{name}-drafter DIR")
    drafter = _engine_drafter(str(path), name, target, dtype=target.dtype, **budget)  # in the target's dtype
    return EngineMethod(name, target, drafter, checkpoint=path, matmul_path=options.matmul_path)


def _engine_drafter(source: str, kind: str, target: TargetModel, **options):
    try:
        return make_drafter(source, target, **options)
    except (ValueError, OSError) as err:
        raise _Unavailable(f"cannot load the {kind} drafter from {source}: {err}") from err


def _assistant(target: TargetModel, spec: str):
    """The draft model of hf-assisted: the target's first ``spec`` layers (weights shared), or a model directory."""
    from transformers import AutoModelForCausalLM

    if spec.isdigit():
        return truncated_copy(target.model, int(spec))
    try:
        assistant = AutoModelForCausalLM.from_pretrained(spec, dtype=target.dtype).to(target.device).eval()
    except (OSError, ValueError) as err:
        raise _Unavailable(f"cannot load the assistant model {spec!r}: {err}") from err
    if assistant.config.vocab_size != target.config.vocab_size:
        raise _Unavailable(f"assistant {spec!r} has vocabulary size {assistant.config.vocab_size}, the target "
                           f"{target.config.vocab_size}: hf-assisted needs a model with the target's tokenizer")
    return assistant


def truncated_copy(model, num_layers: int):
    """A causal LM made of ``model``'s embeddings, first ``num_layers`` decoder layers, final norm and LM head.

    The tensors are the target's own (``load_state_dict(assign=True)``): no weight is copied.
    """
    from transformers import AutoModelForCausalLM

    total = model.config.num_hidden_layers
    if not 1 <= num_layers < total:
        raise _Unavailable(f"--assistant {num_layers} layers: a truncated assistant needs 1 to {total - 1} of the "
                           f"target's {total} layers")
    config = copy.deepcopy(model.config)
    config.num_hidden_layers = num_layers
    if getattr(config, "layer_types", None):
        config.layer_types = config.layer_types[:num_layers]
    assistant = AutoModelForCausalLM.from_config(config, dtype=model.dtype)
    state = {k: v for k, v in model.state_dict().items()
             if not k.startswith("model.layers.") or int(k.split(".")[2]) < num_layers}
    try:
        assistant.load_state_dict(state, assign=True, strict=True)
    except RuntimeError as err:
        raise _Unavailable(f"cannot truncate a {type(model).__name__} by layer index: {err}; pass --assistant "
                           "with the directory of a small model that shares the target's tokenizer") from err
    assistant.generation_config = copy.deepcopy(model.generation_config)
    return assistant.to(model.device).eval()
