"""One-row products on this CPU: a matrix-vector product against the same row computed as a two-column GEMM.

The built-in model's layer shapes, float32, median ms over 40 calls after 3 warm-ups. Why ``kernels.py`` pads one
row to two on the few-row path: on a 2-core AMD EPYC (MKL, two threads) the 49152 x 576 output layer took 9.4 ms
as ``F.linear`` of one row and 2.9 ms as ``weight @ [x; 0].T``. Calibration decides per machine; this only shows why.

usage: python benchmarks/one_row_products.py [--threads N]
"""

import argparse
import statistics
import time

import torch
from torch import nn

SHAPES = {"output layer": (49152, 576), "mlp up": (1536, 576), "mlp down": (576, 1536), "attention": (576, 576)}


def median_ms(fn, calls: int = 40) -> float:
    for _ in range(3):
        fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} threads; ms per product (median)")
    print(f"{'layer':14s} {'out x in':>12s} {'F.linear 1 row':>15s} {'padded to 2 rows':>17s} {'F.linear 2 rows':>16s}")
    for name, (out, inp) in SHAPES.items():
        weight, row, rows = torch.randn(out, inp), torch.randn(1, inp), torch.randn(2, inp)
        padded = torch.cat([row, torch.zeros_like(row)])
        one = median_ms(lambda: nn.functional.linear(row, weight))
        two_col = median_ms(lambda: torch.matmul(weight, padded.t())[:, :1].t().contiguous())
        two = median_ms(lambda: nn.functional.linear(rows, weight))
        print(f"{name:14s} {f'{out}x{inp}':>12s} {one:15.3f} {two_col:17.3f} {two:16.3f}")


if __name__ == "__main__":
    main()
