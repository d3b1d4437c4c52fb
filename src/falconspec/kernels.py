"""Matrix-product paths for the few-row forwards speculative verification runs, chosen per row count by measurement.

A tree verification runs the target over a handful of tokens at once. Which product is fastest for 1-32 rows
depends on the machine: on one 2-core AMD EPYC (MKL, fp32) stock ``F.linear`` over 2-16 rows cost ~1.5x a one-row
step while ``weight @ x.T`` (the few rows become the small GEMM dimension) cost ~0.9x; on a 2-core Xeon with
AVX-512/AMX the same ``weight @ x.T`` cost 2.2x and stock ``F.linear`` 1.1-1.6x. Even one row, a plain decoding
step, is not settled: on that AMD EPYC, ``F.linear`` of one row (a matrix-vector product) over the 49152 x 576
output layer took 9.4 ms against 2.9 ms for ``weight @ x.T`` with the row and a zero row beside it. So no path is a
default. Three paths (float32 on a CPU; everything else takes ``F.linear``):

* ``stock``: ``F.linear``;
* ``few-row``: ``weight @ x.T``, one row padded to two (a GEMM, not a matrix-vector product);
* ``onednn``: oneDNN's linear over a copy of the weight reordered into oneDNN's blocked layout, made once per weight
  and kept beside it (re-made when the weight changes). A BLAS GEMM packs its operands on every call; a weight packed
  once is not re-read for that. On the AMD EPYC (two threads) a 6-32-node forward of the built-in model cost 20-47%
  less this way than on the few-row path, while one- and two-row steps stayed faster on the few-row path. The copy
  doubles the memory of the layers that take this path.

:mod:`.calibrate` times every path on the real model and records, per row count, the fastest. This module only
carries that decision out. :class:`MatmulPolicy` holds the chosen path per row count (none: everything is stock).
:func:`attach_policy` makes a model's plain ``nn.Linear`` layers consult a policy; parameters, state-dict keys and
``isinstance(m, nn.Linear)`` stay as they were, and with an empty policy the forward is ``F.linear``. The paths
round differently (~1e-6 relative in fp32), just as any batched forward does; greedy equality with plain decoding is
tested end to end, not assumed.
"""

from __future__ import annotations

import bisect
import os
from typing import Mapping

import torch
from torch import nn

STOCK, FEW_ROW, ONEDNN = "stock", "few-row", "onednn"
PATHS = (STOCK, FEW_ROW, ONEDNN)
# the row count oneDNN lays a reordered weight out for (any row count can use it). On the AMD EPYC, 3-32-node forwards
# were fastest with 8 or 16 and up to 1.4x slower with 1
ONEDNN_ROWS_HINT = 8


def onednn_available() -> bool:
    return (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
            and hasattr(torch.ops.mkldnn, "_reorder_linear_weight"))


def available_memory() -> int | None:
    """Bytes of memory available now: Linux's MemAvailable (free plus reclaimable page cache), else free pages; None
    where unknown."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (AttributeError, ValueError, OSError):
        return None


def linear_weight_bytes(model: nn.Module) -> int:
    return sum(m.weight.numel() * m.weight.element_size() for m in model.modules() if isinstance(m, nn.Linear))


def available_paths(device: torch.device, dtype: torch.dtype, model: nn.Module | None = None) -> list[str]:
    """The product paths worth timing for ``model`` on ``device`` in ``dtype``. The oneDNN path needs a copy of the
    linear weights: it is left out when that copy would not fit in the memory available now (with a quarter to
    spare)."""
    if torch.device(device).type != "cpu" or dtype != torch.float32:
        return [STOCK]
    free = available_memory()
    fits = model is None or free is None or linear_weight_bytes(model) * 1.25 < free
    return [STOCK, FEW_ROW] + ([ONEDNN] if onednn_available() and fits else [])


class MatmulPolicy:
    """The product path per row count, float32 on CPU only: ``{rows: path}`` for the measured row counts; a row count
    between them takes the path of the next measured one up (beyond the largest, the largest's), and an empty
    policy takes ``stock`` everywhere."""

    def __init__(self, paths: Mapping[int, str] | None = None):
        self.paths: dict[int, str] = {}
        self.set(paths or {})

    def set(self, paths: Mapping[int, str]) -> None:
        """Replace the whole policy: ``{rows: path}``."""
        unknown = sorted({p for p in paths.values() if p not in PATHS})
        if unknown:
            raise ValueError(f"unknown product paths {unknown}: choose from {list(PATHS)}")
        if any(int(n) < 1 for n in paths):
            raise ValueError(f"a product path is for 1 or more rows, got {sorted(paths)}")
        self.paths = {int(n): paths[n] for n in sorted(paths, key=int)}
        self._sizes = list(self.paths)

    def path_for(self, rows: int) -> str:
        if not self._sizes:
            return STOCK
        index = bisect.bisect_left(self._sizes, rows)
        return self.paths[self._sizes[min(index, len(self._sizes) - 1)]]

    def sizes(self, path: str) -> frozenset[int]:
        """The measured row counts that take ``path``."""
        return frozenset(n for n, p in self.paths.items() if p == path)

    def __repr__(self) -> str:
        return f"MatmulPolicy({dict(sorted(self.paths.items()))})"


def reordered_weight(weight: torch.Tensor) -> torch.Tensor:
    """``weight`` in oneDNN's layout, made once and kept on the tensor; made again after any in-place change (an
    optimizer step, a loaded state dict)."""
    key = (weight.data_ptr(), weight._version)
    kept = getattr(weight, "_falconspec_onednn", None)
    if kept is None or kept[0] != key:
        kept = (key, torch.ops.mkldnn._reorder_linear_weight(weight.detach(), ONEDNN_ROWS_HINT))
        weight._falconspec_onednn = kept
    return kept[1]


def forget_reordered(module: nn.Module) -> None:
    """Free the oneDNN copies of ``module``'s weights (calibration made them all; a policy without ``onednn`` never
    reads them)."""
    for parameter in module.parameters():
        if hasattr(parameter, "_falconspec_onednn"):
            del parameter._falconspec_onednn


def policy_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  policy: MatmulPolicy) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` on the product path ``policy`` names for x's row count (see the module
    docstring). The ``onednn`` path runs only without autograd (a training step takes ``stock``).

    x: [..., in]; weight: [out, in]; bias: [out] or None; returns [..., out].
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    path = policy.path_for(rows)
    if path == STOCK or rows == 0 or x.device.type != "cpu" or x.dtype != torch.float32:
        return nn.functional.linear(x, weight, bias)
    if path == ONEDNN:
        if torch.is_grad_enabled() and (weight.requires_grad or x.requires_grad):
            return nn.functional.linear(x, weight, bias)
        return torch.ops.mkldnn._linear_pointwise(x, reordered_weight(weight), bias, "none", [], "")
    columns = x.reshape(rows, x.shape[-1])
    if rows == 1:
        columns = torch.cat([columns, columns.new_zeros(1, x.shape[-1])])
    # [rows, out], made contiguous: the transposed view would hand its column-major layout on to every later op
    # (the residual stream included); on the AMD EPYC that made a 2-node forward 51 ms instead of 38 ms
    out = torch.matmul(weight, columns.t())[:, :rows].t().contiguous()
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class PolicyLinear(nn.Linear):
    """An ``nn.Linear`` whose product path follows a shared :class:`MatmulPolicy` (see the module docstring)."""

    policy: MatmulPolicy

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return policy_linear(x, self.weight, self.bias, self.policy)


def attach_policy(model: nn.Module, policy: MatmulPolicy) -> int:
    """Make every plain ``nn.Linear`` in ``model`` follow ``policy`` (in place); returns how many layers."""
    attached = 0
    for module in model.modules():
        if type(module) is nn.Linear or type(module) is PolicyLinear:
            module.__class__ = PolicyLinear
            module.policy = policy
            attached += 1
    return attached
