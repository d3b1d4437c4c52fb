"""Matrix products over a few rows on CPU, where speculative verification spends its time.

A tree verification runs the target over a handful of tokens at once. On CPU, ``F.linear`` over 2-16 rows takes
a matrix-matrix path that costs about 1.5x the one-row (matrix-vector) path, so verifying even two tokens costs
1.5 plain decoding steps, and a drafter must land ~2 extra tokens per cycle just to break even. The same product
written as ``weight @ x.T`` (the few rows become the small dimension of the GEMM) does not pay that price.

Measured on this project's 2-core CPU (torch 2.13 with MKL, fp32), one SmolLM2-135M forward over n tokens on a
256-token cache, median ms (``benchmarks/verify_cost.py``)::

    n            1      2      4      6      8     12     16
    F.linear   36.0   54.6   54.9   53.2   53.6   58.2   64.0
    weight@x.T 35.3   32.0   33.4   44.2   47.3   67.3   57.3

In bfloat16 the stock path is already flat (20.5 ms at n=1, 22.2 at n=8) and ``weight @ x.T`` is slower (~32 ms),
so only float32 takes it. :func:`use_small_batch_matmul` switches a model's ``nn.Linear`` layers to
:class:`SmallBatchLinear`, which takes that path for 2..``max_rows`` float32 rows on CPU and is plain
``nn.Linear`` otherwise: one-row decoding steps, prefill, bf16 and every GPU computation are untouched. Parameters, state-dict keys and ``isinstance(m, nn.Linear)`` stay as
they were. The two paths round differently (~1e-7 relative in fp32), just as any batched forward does; greedy
equality with plain decoding is tested end to end, not assumed.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_MAX_ROWS = 8


def small_batch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                       max_rows: int = DEFAULT_MAX_ROWS) -> torch.Tensor:
    """``F.linear(x, weight, bias)``; for 2..max_rows float32 rows on CPU, computed as ``weight @ x.T``.

    x: [..., in]; weight: [out, in]; bias: [out] or None; returns [..., out].
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if x.device.type != "cpu" or x.dtype != torch.float32 or not 2 <= rows <= max_rows:
        return nn.functional.linear(x, weight, bias)
    out = torch.matmul(weight, x.reshape(rows, x.shape[-1]).t()).t()  # [rows, out]
    if bias is not None:
        out = out + bias
    return out.reshape(*x.shape[:-1], weight.shape[0])


class SmallBatchLinear(nn.Linear):
    """An ``nn.Linear`` whose few-row CPU products take the faster path (see the module docstring)."""

    max_rows: int = DEFAULT_MAX_ROWS

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return small_batch_linear(x, self.weight, self.bias, self.max_rows)


def use_small_batch_matmul(model: nn.Module, max_rows: int = DEFAULT_MAX_ROWS) -> int:
    """Switch every plain ``nn.Linear`` in ``model`` to :class:`SmallBatchLinear` in place; returns how many."""
    if max_rows < 2:
        raise ValueError(f"max_rows must be >= 2 (1 row already takes the matrix-vector path), got {max_rows}")
    switched = 0
    for module in model.modules():
        if type(module) is nn.Linear or type(module) is SmallBatchLinear:
            module.__class__ = SmallBatchLinear
            module.max_rows = max_rows
            switched += 1
    return switched
