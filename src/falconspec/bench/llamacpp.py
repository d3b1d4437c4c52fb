"""llama.cpp as a peer in the benchmark: the target's GGUF file decoded by llama.cpp, through xllamacpp.

* ``llamacpp``: llama.cpp's plain greedy decoding (or seeded sampling) of the target's GGUF file, read as it is (the
  built-in model's Q4_1 weights, multiplied with 8-bit quantized activations);
* ``llamacpp-ngram``: llama.cpp's speculation without a draft model, ``ngram-simple``: the last ``NGRAM_LOOKUP``
  tokens are looked up earlier in the sequence and what followed them is drafted, up to ``NGRAM_DRAFT`` tokens
  (the n-gram and depth of our ``pld``);
* ``llamacpp-eagle3``: llama.cpp's EAGLE-3 speculation, ``draft-eagle3``, with a draft GGUF file given by
  ``--llamacpp-draft`` (``falconspec export --format gguf`` writes one), drafting chains of up to ``EAGLE3_DRAFT``
  tokens.

xllamacpp (the optional extra ``falconspec[llamacpp]``) runs llama.cpp's own server inside this process. Each method
builds an ``xllamacpp.Server`` from ``CommonParams`` (model path, context, threads = torch's, speculative types and
their parameters) for each of its turns and drops it after, because an idle server slows torch in the same process
(on the 2-core AMD EPYC a plain step of our engine took 58 ms beside one server, 34 ms without it). Building the
server (0.3 s for the built-in GGUF) and a one-token warm-up request are not timed. Each turn is one timed
``Server.handle_completions`` request whose ``prompt`` is the list of token ids
the other methods get (llama.cpp adds no BOS and applies no template to ids), greedy (temperature 0, top-k 1, every
penalty off), ``max_tokens`` = max_new_tokens, and ``cache_prompt`` off so that every turn prefills its whole prompt as
our engine does. ``verbose`` and ``return_tokens`` make the response carry the generated ids
(``__verbose.tokens``, the end-of-generation token included; it is cut here) and ``timings`` carries llama.cpp's
own counts: ``prompt_ms``, ``predicted_n``, ``predicted_per_second`` and, once a draft was made, ``draft_n`` and
``draft_n_accepted``. The tokens committed per verification forward are not reported, so the speculative methods
have no accepted lengths (their τ is not shown; their acceptance is).

llama.cpp's arithmetic differs from our float32 engine's, so its greedy answers are not ours: ``llamacpp`` is compared
with ``greedy`` and the speculative llama.cpp methods with ``llamacpp`` (``methods.COMPARED_WITH``).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import secrets
import time
from pathlib import Path

import torch

from ..models import BUILTIN_MODELS, ModelNotFoundError, builtin_gguf
from ..target import TargetModel
from .datasets import display_path
from .methods import LLAMACPP_METHODS, Method, MethodOptions, TurnResult, _Unavailable

INSTALL = "pip install 'falconspec[llamacpp]'"
SPECULATION = {"llamacpp": None, "llamacpp-ngram": "ngram-simple", "llamacpp-eagle3": "draft-eagle3"}
NGRAM_LOOKUP, NGRAM_DRAFT = 3, 10  # ngram-simple: n-gram looked up, longest draft (llama.cpp's defaults: 12, 48)
EAGLE3_DRAFT, EAGLE3_MIN, EAGLE3_P_MIN = 3, 0, 0.0  # draft-eagle3: llama.cpp's defaults, pinned
QUIET = 1  # llama.cpp's log verbosity: errors only (3, its default, logs every request)
# request fields that would change what greedy or sampling means, pinned to neutral
NEUTRAL = {"top_p": 1.0, "min_p": 0.0, "typical_p": 1.0, "top_n_sigma": -1.0, "xtc_probability": 0.0,
           "repeat_penalty": 1.0, "presence_penalty": 0.0, "frequency_penalty": 0.0, "dry_multiplier": 0.0,
           "mirostat": 0, "n_probs": 0, "ignore_eos": False, "stop": []}
MIN_TOKENS_TO_DRAFT = 4  # an answer this long must have had an EAGLE-3 draft, or llama.cpp dropped the draft model


def build_llamacpp_method(name: str, target: TargetModel, model: str, options: MethodOptions) -> "LlamaCppMethod":
    """One llama.cpp method on the target's GGUF file; ``_Unavailable`` (a skipped method) with the reason."""
    assert name in LLAMACPP_METHODS, name
    if importlib.util.find_spec("xllamacpp") is None:
        raise _Unavailable(f"llama.cpp methods need xllamacpp: {INSTALL}")
    gguf = target_gguf(model)
    draft = eagle3_draft(options.llamacpp_draft or shipped_eagle3_gguf(target, gguf)) \
        if name == "llamacpp-eagle3" else None
    return LlamaCppMethod(name, target, gguf, threads=torch.get_num_threads(), draft=draft)


def target_gguf(model: str) -> Path:
    """The GGUF file the target was loaded from (only built-in models are)."""
    if model not in BUILTIN_MODELS:
        raise _Unavailable(f"llama.cpp needs the target as a GGUF file and {model!r} was not loaded from one: only "
                           f"the built-in models ({', '.join(BUILTIN_MODELS)}) are")
    try:
        return builtin_gguf(model)
    except ModelNotFoundError as err:
        raise _Unavailable(f"no GGUF file for llama.cpp: {err}") from err


def shipped_eagle3_gguf(target: TargetModel, target_gguf: Path) -> str | None:
    """The EAGLE-3 drafter shipped for the built-in target as a draft GGUF, exported once into the cache (keyed by
    the drafter's weights); None when no EAGLE-3 drafter ships for it."""
    from ..drafters import shipped_drafter_dir
    from ..export import export_gguf
    from ..models import cache_dir

    drafter = shipped_drafter_dir(target.name, "eagle3")
    if not (drafter / "model.safetensors").is_file():
        return None
    digest = hashlib.sha256((drafter / "model.safetensors").read_bytes()).hexdigest()[:16]
    out = cache_dir() / "exports" / f"{drafter.name}-{digest}.gguf"
    if not out.is_file():
        tmp = out.with_name(out.name + ".tmp")
        export_gguf(drafter, tmp, target_gguf)
        tmp.replace(out)
    return str(out)


def eagle3_draft(path: str | None) -> Path:
    if not path:
        raise _Unavailable("llamacpp-eagle3 needs an EAGLE-3 draft GGUF file: no EAGLE-3 drafter ships for this "
                           "model, so pass --llamacpp-draft PATH (falconspec export --format gguf writes one)")
    draft = Path(path)
    if not draft.is_file():
        raise _Unavailable(f"no EAGLE-3 draft GGUF file at {path} (--llamacpp-draft)")
    try:
        architecture = _gguf_architecture(draft)
    except Exception as err:  # gguf raises assorted errors on a file that is not GGUF
        raise _Unavailable(f"cannot read --llamacpp-draft {path} as a GGUF file: {type(err).__name__}: {err}") from err
    if architecture != "eagle3":
        raise _Unavailable(f"--llamacpp-draft {path} holds a {architecture!r} model, llama.cpp's EAGLE-3 "
                           "speculation needs an 'eagle3' one (falconspec export --format gguf)")
    return draft


class LlamaCppMethod(Method):
    """One ``xllamacpp.Server`` (llama.cpp's server, in process, one slot) answering token-id completion requests."""

    def __init__(self, name: str, target: TargetModel, gguf: Path, threads: int, draft: Path | None = None):
        try:
            import xllamacpp
        except (ImportError, OSError) as err:  # e.g. a shared library it links is missing
            raise _Unavailable(f"xllamacpp cannot be imported ({type(err).__name__}: {err}): {INSTALL}") from err

        self.name, self.tokenizer, self.eos = name, target.tokenizer, set(target.eos_token_ids)
        self.speculation, self.draft = SPECULATION[name], draft
        try:
            params = llamacpp_params(xllamacpp, gguf, target.max_context, threads, self.speculation, draft)
        except (AttributeError, KeyError, TypeError) as err:  # another xllamacpp version, another parameter API
            raise _Unavailable(f"xllamacpp {_version()} lacks a parameter falconspec sets ({type(err).__name__}: "
                               f"{err}): {INSTALL}") from err
        try:
            probe = xllamacpp.Server(params)  # loads now: a file llama.cpp cannot read skips the method up front
        except RuntimeError as err:
            what = display_path(gguf) + (f" with the draft {display_path(draft)}" if draft else "")
            raise _Unavailable(f"llama.cpp cannot load {what}: {err} (its log above says why)") from err
        warm_up(probe, {"prompt": [min(self.eos)], **NEUTRAL, "temperature": 0.0, "top_k": 1, "cache_prompt": False})
        del probe
        self._server = functools.partial(xllamacpp.Server, params)  # one per turn (module docstring)
        self._parameters = _gguf_parameters(draft) if draft else 0
        self._source = None if draft is None else {"path": display_path(draft), "file": draft.name,
                                                   "weights_sha256": hashlib.sha256(draft.read_bytes()).hexdigest()}

    def generate(self, input_ids, max_new_tokens, temperature, seed):
        request = {"prompt": [int(t) for t in input_ids], "max_tokens": max_new_tokens, **NEUTRAL,
                   "cache_prompt": False, "return_tokens": True, "verbose": True}
        if temperature > 0:
            request.update(temperature=temperature, top_k=0, seed=seed)
        else:
            request.update(temperature=0.0, top_k=1, seed=0)
        server = self._server()
        warm_up(server, request)  # untimed: a new server's first request pays
        start = time.perf_counter()
        response = server.handle_completions(request)
        wall = time.perf_counter() - start
        del server  # its threads stop: the methods timed next get the cores back
        return self.turn_result(response, wall, max_new_tokens, seed)

    def turn_result(self, response: dict, wall: float, max_new_tokens: int, seed: int | None) -> TurnResult:
        """Our token accounting from a completion response: EOS cut and uncounted, at most max_new_tokens."""
        verbose = response.get("__verbose") or {}
        if not response.get("choices") or "tokens" not in verbose:
            why = response.get("error") or response.get("message") or response
            raise RuntimeError(f"llama.cpp returned no tokens: {why}")
        tokens = [int(t) for t in verbose["tokens"]]
        timings = response.get("timings") or verbose.get("timings") or {}
        cut = next((i for i, t in enumerate(tokens) if t in self.eos), None)
        stopped = cut is not None or verbose.get("stop_type") == "eos"
        if cut is None and stopped:  # another end-of-generation token of llama.cpp's vocabulary ended the answer
            cut = max(len(tokens) - 1, 0)
        kept = tokens[:len(tokens) if cut is None else cut][:max_new_tokens]
        forwards = int(timings.get("predicted_n", len(tokens)))  # the EOS token's forward included, as hf counts
        if self.speculation is None:
            lengths, drafted, accepted = [1] * forwards, None, None
        else:  # llama.cpp omits both counts until a draft is made
            lengths, drafted, accepted = [], int(timings.get("draft_n", 0)), int(timings.get("draft_n_accepted", 0))
        if self.speculation == "draft-eagle3" and not drafted and forwards >= MIN_TOKENS_TO_DRAFT:
            raise RuntimeError(f"llama.cpp made no EAGLE-3 draft in {forwards} tokens: it could not use "
                               f"{display_path(self.draft)} as a draft model (its error is in the log above)")
        prefill = timings["prompt_ms"] / 1000 if "prompt_ms" in timings else None
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return TurnResult(kept, text, wall, lengths, "stop" if stopped else "length", seed, drafted, accepted,
                          prefill_time=prefill)

    def num_parameters(self) -> int:
        return self._parameters

    def drafter_source(self) -> dict | None:
        return self._source


def warm_up(server, request: dict) -> None:
    """Send ``server`` (a new ``xllamacpp.Server``) ``request`` cut to one token, untimed. Every server answers one
    before it is dropped: xllamacpp's ``Server`` destructor stops llama.cpp's task loop by clearing a flag that the
    loop sets as it starts, so a server dropped before its loop's thread got that far waits for it forever (seen in
    the probe of ``LlamaCppMethod.__init__`` when training processes kept both cores busy). A server that has
    answered a request has a running loop."""
    server.handle_completions({**request, "max_tokens": 1})


def llamacpp_params(xllamacpp, gguf: Path, n_ctx: int, threads: int, speculation: str | None = None,
                    draft: Path | None = None):
    """``CommonParams`` of one method: the target's GGUF file, one slot of the target's context, ``threads`` for
    prefill and decoding, and the speculative type (llama.cpp's name, e.g. ``ngram-simple``) with its parameters."""
    params = xllamacpp.CommonParams()
    params.model.path = str(gguf)
    params.n_ctx = n_ctx
    params.n_parallel = 1
    params.cpuparams.n_threads = threads
    params.cpuparams_batch.n_threads = threads
    params.cache_ram_mib = 0  # no prompt cache in host memory either
    params.verbosity = QUIET
    # the server also listens on 127.0.0.1 (a random port): with a key nobody knows, it answers nothing there but
    # /health; handle_completions calls the server's handlers directly, without the key
    params.api_keys = [secrets.token_hex(16)]
    params.sampling.temp, params.sampling.top_k, params.sampling.seed = 0.0, 1, 0  # every request sets its own
    if speculation is not None:
        kinds = xllamacpp.common_speculative_type
        params.speculative.types = [kinds["COMMON_SPECULATIVE_TYPE_" + speculation.upper().replace("-", "_")]]
    if speculation == "ngram-simple":
        params.speculative.ngram_simple.size_n = NGRAM_LOOKUP
        params.speculative.ngram_simple.size_m = NGRAM_DRAFT
    elif speculation == "draft-eagle3":
        params.speculative.draft.mparams.path = str(draft)
        params.speculative.draft.n_max = EAGLE3_DRAFT
        params.speculative.draft.n_min = EAGLE3_MIN
        params.speculative.draft.p_min = EAGLE3_P_MIN
    elif speculation is not None:
        raise ValueError(f"no parameters for llama.cpp's {speculation!r} speculation")
    return params


def xllamacpp_version() -> str | None:
    """The installed xllamacpp's version (None when it is not installed), without loading llama.cpp."""
    try:
        return importlib.metadata.version("xllamacpp")
    except importlib.metadata.PackageNotFoundError:
        return None


def _version() -> str:
    return xllamacpp_version() or "?"


def _gguf_reader(path: Path):
    from gguf import GGUFReader

    return GGUFReader(str(path))


def _gguf_architecture(path: Path) -> str | None:
    field = _gguf_reader(path).get_field("general.architecture")
    if field is None:
        return None
    if hasattr(field, "contents"):
        return field.contents()
    return bytes(field.parts[field.data[0]]).decode()  # gguf < 0.11


def _gguf_parameters(path: Path) -> int:
    return sum(int(t.n_elements) for t in _gguf_reader(path).tensors)
