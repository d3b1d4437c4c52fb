"""Batched speculative decoding: B sequences, each with its own tree, verified in one target forward.

INTERFACE CONTRACT (being implemented; the server's continuous batching is written against it):

    batch = BatchGenerator(target, drafter, planner="auto", matmul_path=None, max_batch=8)
    seq_id = batch.add(prompt=None, messages=None, input_ids=None, max_new_tokens=128, stop=None,
                       temperature=0.0, top_p=1.0, top_k=0, seed=None, ignore_eos=False)
        # the same arguments as SpeculativeGenerator.stream; validated at once (RequestError, a ValueError, before
        # any state changes); raises BatchFullError when max_batch sequences are active. The sequence is prefilled
        # at the next step() and joins the batch at that cycle boundary.
    batch.cancel(seq_id)          # leaves the batch at once, its slot free for the next add(); unknown ids: no-op
    chunks = batch.step()         # one cycle for every active sequence: dict seq_id -> StreamChunk (only the
                                  # sequences that produced text or finished; a chunk with finish_reason set is
                                  # that sequence's last, and it has left the batch)
    batch.active                  # number of active sequences (added, not finished or cancelled)
    batch.generate(requests)      # convenience: list of stream-kwargs dicts -> list[GenerationResult], in order

Greedy output of each sequence is identical to that sequence decoded alone by SpeculativeGenerator (fp32).
"""

from __future__ import annotations


class BatchFullError(RuntimeError):
    """``max_batch`` sequences are already active."""
