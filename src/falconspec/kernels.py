"""Matrix-product paths for the few-row forwards speculative verification runs, chosen per row count by measurement.

A tree verification runs the target over a handful of tokens at once. Which product is fastest for 2-16 rows
depends on the machine: on one 2-core AMD EPYC (MKL, fp32) stock ``F.linear`` over 2-16 rows cost ~1.5x a one-row
step while ``weight @ x.T`` (the few rows become the small GEMM dimension) cost ~0.9x; on a 2-core Xeon with
AVX-512/AMX the same ``weight @ x.T`` cost 2.2x and stock ``F.linear`` 1.1-1.6x. Even one row, a plain decoding
step, is not settled: on that AMD EPYC, ``F.linear`` of one row (a matrix-vector product) over the 49152 x 576
output layer took 9.4 ms against 2.9 ms for ``weight @ x.T`` with the row and a zero row beside it, and a whole
plain step of the built-in model 54 ms against 35 ms. So on the few-row path one row is padded to two, and no path
is a default:
:mod:`.calibrate` times every path on the real model and records, per row count, the ones where the few-row path
won. This module only carries that decision out.

:class:`MatmulPolicy` holds the row counts that take the few-row path (empty: everything is stock ``F.linear``).
:func:`attach_policy` makes a model's plain ``nn.Linear`` layers consult a policy; parameters, state-dict keys and
``isinstance(m, nn.Linear)`` stay as they were, and with an empty policy the forward is ``F.linear``. The two paths
round differently (~1e-7 relative in fp32), just as any batched forward does; greedy equality with plain decoding
is tested end to end, not assumed.
"""

from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

STOCK, FEW_ROW = "stock", "few-row"
PATHS = (STOCK, FEW_ROW)


class MatmulPolicy:
    """Row counts whose products take the few-row path (``weight @ x.T``); float32 on CPU only."""

    def __init__(self, few_row_sizes: Iterable[int] = ()):
        self.few_row_sizes: frozenset[int] = frozenset()
        self.set(few_row_sizes)

    def set(self, few_row_sizes: Iterable[int]) -> None:
        sizes = frozenset(int(n) for n in few_row_sizes)
        if any(n < 1 for n in sizes):
            raise ValueError(f"the few-row path is for 1 or more rows, got {sorted(sizes)}")
        self.few_row_sizes = sizes

    def path_for(self, rows: int) -> str:
        return FEW_ROW if rows in self.few_row_sizes else STOCK

    def __repr__(self) -> str:
        return f"MatmulPolicy(few_row_sizes={sorted(self.few_row_sizes)})"


def policy_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  policy: MatmulPolicy) -> torch.Tensor:
    """``F.linear(x, weight, bias)``, computed as ``weight @ x.T`` when ``policy`` says so for x's row count (one
    row joined by a zero row, so that the product is a GEMM and not a matrix-vector product).

    x: [..., in]; weight: [out, in]; bias: [out] or None; returns [..., out].
    """
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    if (rows not in policy.few_row_sizes or x.device.type != "cpu" or x.dtype != torch.float32):
        return nn.functional.linear(x, weight, bias)
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
