"""Where a long run's resident memory goes: RSS against live tensors and Python objects, prompt by prompt.

Decodes MT-bench first turns one after another with one generator and prints, every ``--every`` prompts, the
process's RSS beside the count and storage of live tensors and of objects the garbage collector tracks. Flat tensor
and object counts under a rising RSS mean caches below Python (oneDNN's primitive cache, the allocator), not a leak;
``ONEDNN_PRIMITIVE_CACHE_CAPACITY=8`` in the environment bounds the first. ``malloc_trim`` at the end shows how much
the C allocator held as free memory.

usage: python benchmarks/memory_trace.py [--drafter falcon] [--prompts 40] [--every 8] [--threads 1]
"""

import argparse
import ctypes
import ctypes.util
import gc
import json
import warnings

import psutil
import torch

from falconspec import SpeculativeGenerator, load_target
from falconspec.bench.datasets import mt_bench_path
from falconspec.drafters import make_drafter


def live_tensors() -> tuple[int, float, int]:
    """(count, MB of their storages, count in other layouts) over the tensors the garbage collector reaches; a
    storage shared by several tensors counts once. Other layouts are oneDNN's reordered weight copies
    (``kernels.py``), whose size has no storage to read; RSS shows them."""
    storages, count, opaque = {}, 0, 0
    with warnings.catch_warnings():  # isinstance on some deprecated module attributes warns
        warnings.simplefilter("ignore")
        for obj in gc.get_objects():
            if isinstance(obj, torch.Tensor):
                count += 1
                if obj.layout != torch.strided or obj.is_meta:
                    opaque += 1
                else:
                    storages[obj.untyped_storage().data_ptr()] = obj.untyped_storage().nbytes()
    return count, sum(storages.values()) / 2**20, opaque


def report(tag: str) -> None:
    gc.collect()
    count, mb, opaque = live_tensors()
    rss = psutil.Process().memory_info().rss / 2**20
    print(f"{tag:>20s}: RSS {rss:6.0f} MB | live tensors {count:4d} ({mb:4.0f} MB strided, {opaque:3d} other layouts)"
          f" | gc objects {len(gc.get_objects())}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drafter", default="falcon")
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--every", type=int, default=8)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    target = load_target("smollm2-135m", dtype="float32", device="cpu")
    generator = SpeculativeGenerator(target, make_drafter(args.drafter, target))
    with open(mt_bench_path(), encoding="utf-8") as f:
        questions = [json.loads(line)["turns"][0] for line in f if line.strip()][: args.prompts]
    report("before decoding")
    for i, question in enumerate(questions, 1):
        generator.generate(messages=[{"role": "user", "content": question}], max_new_tokens=args.max_new_tokens)
        if i % args.every == 0 or i == len(questions):
            report(f"after {i} prompts")
    libc = ctypes.util.find_library("c")
    if libc:
        ctypes.CDLL(libc).malloc_trim(0)
        report("after malloc_trim")


if __name__ == "__main__":
    main()
