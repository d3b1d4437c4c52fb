"""Answers to many conversations at once, turn after turn, each conversation's KV cache kept between turns: greedy,
or sampled at a temperature from a seeded generator.

gen-data's default way of answering (``--cache reuse``). Answering turn ``t`` of a conversation with ``generate``
prefills its whole history again, and the histories of multi-turn ShareGPT conversations are several times their
answers. Here the conversations of a batch share one :class:`~.kv_cache.KVCache` of one row each:

* a **round** extends every row by the tokens that are new since its last forward (its last answer token, the
  template's text closing the answer, the next user message, the answer prompt), then decodes (greedily, or by
  sampling), one token per row per forward, until every row's answer has ended (an end-of-turn token or its
  budget; a row whose answer ended feeds padding), or, with ``until_ended``, until that many have: gen-data ends a
  round once a quarter of its rows have, and the unfinished rows continue their answers in the next round, whose
  only new token for them is their last answer token (:func:`~.token_data.stream_dialogues`);
* the new tokens are prefilled right-aligned, in at most four forwards of rows with similar lengths
  (:func:`prefill_groups`, each on a copy of its rows' cache, stacked and packed again afterwards): in one forward
  a single long user message padded all 32 rows to its length, and 84% of the prefilled row-columns were padding;
* rows are not aligned with each other: a row's positions count its own real tokens, padding columns are masked out
  for every query (a float mask ``[B, 1, new, cached + new]``) and a padding query sees only itself;
* between rounds the cache keeps only the rows of conversations with a turn to go, each with its real positions
  packed to the right (:meth:`~.kv_cache.KVCache.select`), so padding does not pile up over the turns; new
  conversations take the free rows (an empty cache row: their first prompt is their new tokens), so the batch stays
  full while conversations are waiting.

Which tokens are answered, cut and budgeted is decided by :class:`~.token_data.Dialogue` exactly as on the
``generate`` path; in float32 the answers are those of answering each conversation alone (tests check it).

Measured on the 2-core development CPU (two threads, fp32, 32 ShareGPT train conversations, 64 new tokens per
answer): 171 s against 280 s for ``generate`` turn by turn, byte-identical shards. Grouped prefill and early round
ends (``benchmarks/gen_data_batching.py``, AMD EPYC, bf16, one thread, 48 conversations): 59.7 answer tok/s against
26.2 with one padded prefill forward and rounds run to their longest answer.
"""

from __future__ import annotations

import torch

from .kv_cache import KVCache


class DialogueBatch:
    """B conversations' rows in one KV cache: :meth:`answer` runs one round."""

    MAX_PREFILL_FORWARDS = 4  # rows are prefilled in at most this many groups of similar new lengths

    def __init__(self, model, eos: list[int], pad: int, temperature: float = 0.0,
                 generator: torch.Generator | None = None):
        if temperature < 0 or (temperature > 0 and generator is None):
            raise ValueError(f"sampling needs a temperature > 0 and a generator, got {temperature} and {generator}")
        self.model, self.eos, self.pad = model, set(eos), pad
        self.temperature, self.generator = temperature, generator  # 0: greedy
        self.cache = KVCache(model.config)
        self.valid = torch.zeros(0, 0, dtype=torch.bool)  # [rows, columns]: which cached columns are real tokens
        self.cached: list[int] = []  # per row: real tokens cached (= the row's next position)

    @torch.inference_mode()
    def answer(self, rows: list[int | None], prompts: list[list[int]], budgets: list[int],
               until_ended: int | None = None) -> tuple[list[list[int]], int]:
        """One round: row ``i`` continues row ``rows[i]`` of the last round (None: a new, empty row) with prompt
        ``prompts[i]``, which must start with what that row has cached; rows of the last round not continued are
        dropped. Returns the answers (each up to and including its end-of-turn token, at most its budget) and
        the number of tokens prefilled. ``until_ended``: stop decoding once that many answers have ended (default:
        all); the others are returned unfinished, and a later round continues such a row with its prompt plus what it
        has answered so far (its last token is then the only new one) and the rest of its budget."""
        if len(rows) != len(prompts) or len(budgets) != len(prompts) or not prompts:
            raise ValueError(f"need one row and one budget per prompt, got {len(rows)} rows, {len(budgets)} budgets "
                             f"and {len(prompts)} prompts")
        if min(budgets) < 1:
            raise ValueError(f"every budget must be at least one token, got {min(budgets)}")
        self._keep(rows)
        segments = []
        for cached, prompt in zip(self.cached, prompts):
            if len(prompt) <= cached:
                raise ValueError(f"a prompt of {len(prompt)} tokens does not extend its row's {cached} cached tokens")
            segments.append(prompt[cached:])
        following = self._prefill(segments)

        answers: list[list[int]] = [[] for _ in rows]
        done = [False] * len(rows)
        while True:
            for row, token in enumerate(following.tolist()):
                if not done[row]:
                    answers[row].append(token)
                    done[row] = token in self.eos or len(answers[row]) >= budgets[row]
            if sum(done) >= (until_ended or len(rows)):
                return answers, sum(map(len, segments))
            live = torch.tensor([not d for d in done])
            last = torch.tensor([a[-1] if not d else self.pad for a, d in zip(answers, done)])
            following = self._forward(last[:, None], torch.tensor(self.cached)[:, None], live[:, None])

    def _prefill(self, segments: list[list[int]]) -> torch.Tensor:
        """Append each row's new tokens to its cache; the token that follows each row [B]. Rows of similar
        length are prefilled together (:func:`prefill_groups`), each group in a forward of its own on its rows'
        cache, and the groups' caches are stacked and packed again, so a long segment does not pad every row."""
        groups = prefill_groups([len(s) for s in segments], self.MAX_PREFILL_FORWARDS)
        if len(groups) == 1:
            return self._forward(*_right_aligned(segments, self.cached, self.pad))
        parts, following = [], torch.zeros(len(segments), dtype=torch.long)
        for group in groups:
            part = self._part(group)
            following[group] = part._forward(*_right_aligned([segments[i] for i in group], part.cached, self.pad))
            parts.append(part)
        self._join(parts, groups)
        return following

    def _part(self, rows: list[int]) -> "DialogueBatch":
        """A batch of rows ``rows`` of this one (copies of their cache); this one is left as it is."""
        part = DialogueBatch(self.model, sorted(self.eos), self.pad, self.temperature, self.generator)
        index = torch.tensor(rows, dtype=torch.long)
        if self.valid.shape[1]:
            part.cache = self.cache.take_rows(index)
        part.valid, part.cached = self.valid[index], [self.cached[i] for i in rows]
        return part

    def _join(self, parts: list["DialogueBatch"], rows: list[list[int]]) -> None:
        """This batch becomes the rows of ``parts``, part ``p``'s row ``k`` as row ``rows[p][k]``, each row's real
        columns packed to the right."""
        self.cache = KVCache.stack_rows([part.cache for part in parts])
        width = max(part.valid.shape[1] for part in parts)
        self.valid = torch.cat([torch.nn.functional.pad(part.valid, (0, width - part.valid.shape[1]))
                                for part in parts])
        self.cached = [c for part in parts for c in part.cached]
        stacked = {row: n for n, row in enumerate(row for part_rows in rows for row in part_rows)}
        self._keep([stacked[row] for row in range(len(stacked))])

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Append ``tokens`` [B, n] (``real`` [B, n]: False for padding) to the cache; the token that follows
        each row's last column [B] (sampled at ``temperature`` if it is above 0)."""
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
        logits = out.logits[:, -1].float().cpu()
        if not self.temperature:
            return logits.argmax(-1)
        return torch.multinomial(torch.softmax(logits / self.temperature, -1), 1, generator=self.generator)[:, 0]

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


def _right_aligned(segments: list[list[int]], cached: list[int], pad: int) -> tuple[torch.Tensor, ...]:
    """Tokens [B, width] of ``segments`` right-aligned with ``pad`` before them, their positions (row ``b``'s from
    ``cached[b]`` on) and which columns are real."""
    width = max(map(len, segments))
    tokens = torch.full((len(segments), width), pad, dtype=torch.long)
    real = torch.zeros(len(segments), width, dtype=torch.bool)
    positions = torch.zeros(len(segments), width, dtype=torch.long)
    for row, (segment, start) in enumerate(zip(segments, cached)):
        tokens[row, width - len(segment):] = torch.tensor(segment)
        real[row, width - len(segment):] = True
        positions[row, width - len(segment):] = torch.arange(start, start + len(segment))
    return tokens, positions, real


def prefill_groups(lengths: list[int], max_groups: int) -> list[list[int]]:
    """Rows (indices into ``lengths``) in at most ``max_groups`` groups of consecutive lengths, the partition with
    the fewest padded row-columns (sum over groups of rows x longest): one forward per group pads each row only to
    its group's longest. Dynamic programming over the rows sorted by length."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    sizes = [lengths[i] for i in order]
    n, inf = len(sizes), float("inf")
    # best[g][j]: fewest row-columns for the first j sorted rows in g groups; cut[g][j]: where its last group starts
    best = [[0.0] + [inf] * n] + [[inf] * (n + 1) for _ in range(max_groups)]
    cut = [[0] * (n + 1) for _ in range(max_groups + 1)]
    for g in range(1, max_groups + 1):
        for j in range(1, n + 1):
            for i in range(j):
                cost = best[g - 1][i] + (j - i) * sizes[j - 1]
                if cost < best[g][j]:
                    best[g][j], cut[g][j] = cost, i
    g = min(range(1, max_groups + 1), key=lambda k: (best[k][n], k))  # fewest groups among the cheapest
    groups, j = [], n
    while j:
        i = cut[g][j]
        groups.append(order[i:j])
        j, g = i, g - 1
    return groups[::-1]
