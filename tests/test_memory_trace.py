"""benchmarks/memory_trace.py counts live tensors by storage, so its 'no leak' reading rests on that count."""

import gc

import torch

from repo_scripts import load_script

memory_trace = load_script("benchmarks/memory_trace.py")


def test_live_tensors_counts_new_tensors_and_shared_storage_once():
    gc.collect()
    count, mb, _ = memory_trace.live_tensors()
    base = torch.zeros(1024, 1024)  # 4 MiB
    views = [base[i] for i in range(3)]  # three more tensors, no more storage
    count_after, mb_after, _ = memory_trace.live_tensors()
    assert count_after - count == 4
    assert 3.9 < mb_after - mb < 4.1
    del base, views
    gc.collect()
    count_freed, mb_freed, _ = memory_trace.live_tensors()
    assert count_freed == count and abs(mb_freed - mb) < 0.1


def test_live_tensors_counts_other_layouts_apart():
    _, _, opaque = memory_trace.live_tensors()
    sparse = torch.eye(4).to_sparse()
    _, _, opaque_after = memory_trace.live_tensors()
    assert opaque_after - opaque == 1
    del sparse
