"""Greedy answers to many conversations at once, turn after turn, each conversation's KV cache kept between turns.

gen-data's default way of answering (``--cache reuse``). Answering turn ``t`` of a conversation with ``generate``
prefills its whole history again, and the histories of multi-turn ShareGPT conversations are several times their
answers. Here the conversations of a batch share one :class:`~.kv_cache.KVCache` of one row each:

* a **round** extends every row by the tokens that are new since its last forward (its last answer token, the
  template's text closing the answer, the next user message, the answer prompt), right-aligned in one forward, then
  decodes greedily, one token per row per forward, until every row's answer has ended (an end-of-turn token or its
  budget); a row whose answer ended feeds padding;
* rows are not aligned with each other: a row's positions count its own real tokens, padding columns are masked out
  for every query (a float mask ``[B, 1, new, cached + new]``) and a padding query sees only itself;
* between rounds the cache keeps only the rows of conversations with a turn to go, each with its real positions
  packed to the right (:meth:`~.kv_cache.KVCache.select`), so padding does not pile up over the turns; new
  conversations take the free rows (an empty cache row: their first prompt is their new tokens), so the batch stays
  full while conversations are waiting.

Which tokens are answered, cut and budgeted is decided by :class:`~.token_data.Dialogue` exactly as on the
``generate`` path; in float32 the answers are those of answering each conversation alone (tests check it).

Measured on the 2-core development CPU (two threads, fp32, 32 ShareGPT train conversations, 64 new tokens per
answer): 171 s against 280 s for ``generate`` turn by turn, byte-identical shards.
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache


class DialogueBatch:
    """B conversations' rows in one KV cache: :meth:`answer` runs one round."""

    def __init__(self, model, eos: list[int], pad: int):
        self.model, self.eos, self.pad = model, set(eos), pad
        self.cache = KVCache(model.config)
        self.valid = torch.zeros(0, 0, dtype=torch.bool)  # [rows, columns]: which cached columns are real tokens
        self.cached: list[int] = []  # per row: real tokens cached (= the row's next position)

    @torch.inference_mode()
    def answer(self, rows: list[int | None], prompts: list[list[int]],
               budgets: list[int]) -> tuple[list[list[int]], int]:
        """One round: row ``i`` continues row ``rows[i]`` of the last round (None: a new, empty row) with prompt
        ``prompts[i]``, which must start with what that row has cached; rows of the last round not continued are
        dropped. Returns the greedy answers (each up to and including its end-of-turn token, at most its budget) and
        the number of tokens prefilled."""
        if len(rows) != len(prompts) or len(budgets) != len(prompts) or not prompts:
            raise ValueError(f"need one row and one budget per prompt, got {len(rows)} rows, {len(budgets)} budgets "
                             f"and {len(prompts)} prompts")
        self._keep(rows)
        segments = []
        for cached, prompt in zip(self.cached, prompts):
            if len(prompt) <= cached:
                raise ValueError(f"a prompt of {len(prompt)} tokens does not extend its row's {cached} cached tokens")
            segments.append(prompt[cached:])
        width = max(map(len, segments))
        tokens = torch.full((len(rows), width), self.pad, dtype=torch.long)
        real = torch.zeros(len(rows), width, dtype=torch.bool)
        positions = torch.zeros(len(rows), width, dtype=torch.long)
        for row, (segment, cached) in enumerate(zip(segments, self.cached)):
            tokens[row, width - len(segment):] = torch.tensor(segment)
            real[row, width - len(segment):] = True
            positions[row, width - len(segment):] = torch.arange(cached, cached + len(segment))
        following = self._forward(tokens, positions, real)

        answers: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        while True:
            for row, token in enumerate(following.tolist()):
                if not done[row]:
                    answers[row].append(token)
                    done[row] = token in self.eos or len(answers[row]) >= budgets[row]
            if all(done):
                return answers, sum(map(len, segments))
            live = torch.tensor([not d for d in done])
            last = torch.tensor([a[-1] if not d else self.pad for a, d in zip(answers, done)])
            following = self._forward(last[:, None], torch.tensor(self.cached)[:, None], live[:, None])

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` [B, n] (``real`` [B, n]: False for padding) to the cache; the greedy token that follows
        each row's last column [B]."""
        width = tokens.shape[1]
        causal = torch.ones(width, width, dtype=torch.bool).tril()
        own = causal & (real[:, None, :] | torch.eye(width, dtype=torch.bool))  # real keys; padding sees itself
        allowed = torch.cat([self.valid[:, None, :].expand(-1, width, -1), own], dim=-1)
        dtype = self.model.dtype
        mask = torch.zeros(allowed.shape, dtype=dtype).masked_fill_(~allowed, torch.finfo(dtype).min)
        device = self.model.device
        out = self.model(input_ids=tokens.to(device), position_ids=positions.to(device),
                         attention_mask=mask[:, None].to(device), use_cache=True, logits_to_keep=1,
                         **self.cache.forward_kwargs(self.model.forward))
        self.valid = torch.cat([self.valid, real], dim=1)
        self.cached = [c + int(n) for c, n in zip(self.cached, real.sum(1))]
        return out.logits[:, -1].argmax(-1).cpu()

    def _keep(self, rows: list[int | None]) -> None:
        """Keep ``rows`` of the cache (None: a new empty row), each row's real columns packed to the right."""
        old = [r for r in rows if r is not None]
        width = int(self.valid[old].sum(1).max()) if old else 0
        packed = torch.zeros(len(rows), width, dtype=torch.long)  # padding columns point at column 0 (masked)
        valid = torch.zeros(len(rows), width, dtype=torch.bool)
        for row, source in enumerate(rows):
            if source is not None:
                real = self.valid[source].nonzero().flatten()
                packed[row, width - len(real):] = real
                valid[row, width - len(real):] = True
        if self.valid.shape[1]:
            sources = torch.tensor([0 if r is None else r for r in rows], dtype=torch.long)
            self.cache.select(sources, packed)
        self.valid, self.cached = valid, [0 if r is None else self.cached[r] for r in rows]
