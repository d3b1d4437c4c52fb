import pytest
import torch

from falconspec.dialogue_batch import DialogueBatch, prefill_groups
from falconspec.kv_cache import KVCache, SlabLayer


def _logits(target, ids, cache):
    out = target.decoder(input_ids=torch.tensor([ids]), use_cache=True, **cache.forward_kwargs(target.decoder.forward))
    return target.logits(out.last_hidden_state[0])


def test_slab_layers_append_in_place_past_their_capacity_and_crop(llama):
    cache = llama.new_cache()
    assert all(type(layer) is SlabLayer for layer in cache._hf.layers)
    ids = [5 + i % 90 for i in range(3 * SlabLayer.MIN_CAPACITY)]
    reference = _logits(llama, ids, KVCache(llama.config))  # one forward
    step, buffers = [], set()
    for lo in range(0, len(ids), 37):  # grown in pieces: the buffer doubles twice
        with torch.inference_mode():  # as in decoding (views of inference tensors track no base)
            step.append(_logits(llama, ids[lo: lo + 37], cache))
            layer = cache._hf.layers[0]
            assert layer._writable(layer.keys) and layer.keys.shape[-2] == min(lo + 37, len(ids))
        buffers.add(layer._key_buffer.data_ptr())
    assert len(buffers) == 3  # 37 positions reserve 64, then 128, then 256: not a new buffer per forward
    torch.testing.assert_close(torch.cat(step), reference, rtol=1e-4, atol=1e-4)
    cache.crop_to(100)  # a shorter view; the next forward overwrites what was cut (in a new buffer: not inference)
    torch.testing.assert_close(_logits(llama, ids[100:120], cache), reference[100:120], rtol=1e-4, atol=1e-4)
    assert cache.length == 120


def test_select_keeps_rows_and_reorders_positions(llama):
    cache = KVCache(llama.config)
    ids = torch.arange(10, 40).reshape(3, 10)
    llama.decoder(input_ids=ids, use_cache=True, **cache.forward_kwargs(llama.decoder.forward))
    before = [(layer.keys.clone(), layer.values.clone()) for layer in cache._hf.layers]
    positions = torch.tensor([[9, 0, 4], [1, 1, 2]])
    cache.select(torch.tensor([2, 0]), positions)
    assert cache.length == 3
    for layer, (keys, values) in zip(cache._hf.layers, before):
        torch.testing.assert_close(layer.keys[0], keys[2][:, [9, 0, 4]])
        torch.testing.assert_close(layer.values[1], values[0][:, [1, 1, 2]])


def test_take_rows_copies_and_stack_rows_pads_at_the_end(llama):
    cache = KVCache(llama.config)
    llama.decoder(input_ids=torch.arange(10, 40).reshape(3, 10), use_cache=True,
                  **cache.forward_kwargs(llama.decoder.forward))
    short = KVCache(llama.config)
    llama.decoder(input_ids=torch.arange(50, 54).reshape(1, 4), use_cache=True,
                  **short.forward_kwargs(llama.decoder.forward))
    taken = cache.take_rows(torch.tensor([2, 0]))
    stacked = KVCache.stack_rows([taken, short])
    assert cache.length == taken.length == stacked.length == 10
    for whole, mine, theirs, both in zip(cache._hf.layers, taken._hf.layers, short._hf.layers, stacked._hf.layers):
        assert mine.keys.data_ptr() != whole.keys.data_ptr()  # a copy: the source is left as it is
        torch.testing.assert_close(mine.keys, whole.keys[[2, 0]])
        torch.testing.assert_close(both.values[:2], whole.values[[2, 0]])
        torch.testing.assert_close(both.keys[2, :, :4], theirs.keys[0])
        assert not both.keys[2, :, 4:].any()  # padded at the end with zeros
    with pytest.raises(ValueError, match="hold positions"):
        KVCache.stack_rows([taken, KVCache(llama.config)])


def test_dialogue_batch_rounds_answer_as_each_row_alone(llama):
    """Rows of different lengths answered over two rounds (one row dropped, one new row joining, the kept rows
    reordered) give the greedy answers of each prompt decoded alone."""
    model, eos = llama.model, sorted(llama.eos_token_ids)
    prompts = [list(range(20, 31)), list(range(40, 44)), list(range(60, 79))]
    batch = DialogueBatch(model, eos, pad=0)
    first, prefilled = batch.answer([None, None, None], prompts, [6, 3, 5])
    assert prefilled == sum(map(len, prompts))
    second_prompts = [prompts[2] + first[2] + [5, 6, 7], list(range(30, 37)), prompts[0] + first[0] + [8]]
    second, prefilled = batch.answer([2, None, 0], second_prompts, [4, 5, 7])
    assert prefilled == (1 + 3) + 7 + (1 + 1)  # per kept row: its last answer token and the new tokens
    for prompt, answer, budget in zip(prompts + second_prompts, first + second, [6, 3, 5, 4, 5, 7]):
        alone = model.generate(torch.tensor([prompt]), max_new_tokens=budget, do_sample=False,
                               eos_token_id=eos, pad_token_id=0)[0, len(prompt):].tolist()
        cut = next((i + 1 for i, t in enumerate(alone) if t in eos), len(alone))
        assert answer == alone[:cut]


def test_prefill_groups_pad_each_row_only_to_its_group():
    # sorted 3, 4, 50, 98, 100: two groups cost 2 x 4 + 3 x 100 = 308 row-columns, one 500
    assert prefill_groups([3, 100, 4, 98, 50], 2) == [[0, 2], [4, 3, 1]]
    assert prefill_groups([3, 100, 4, 98, 50], 1) == [[0, 2, 4, 3, 1]]
    assert prefill_groups([7, 7, 7], 4) == [[0, 1, 2]]  # nothing to save: one forward
    assert prefill_groups([5], 4) == [[0]]


def test_grouped_prefill_answers_as_one_padded_forward(llama, monkeypatch):
    """A round whose new segments differ in length (some rows continuing, some new) prefills in groups: the same
    answers as prefilling every row in one right-aligned forward, with fewer row-columns forwarded."""
    model, eos = llama.model, sorted(llama.eos_token_ids)
    first = [list(range(20, 23)), list(range(40, 70)), list(range(60, 64)), list(range(10, 14))]
    forward = DialogueBatch._forward

    def run(max_forwards: int) -> tuple[list, int]:
        monkeypatch.setattr(DialogueBatch, "MAX_PREFILL_FORWARDS", max_forwards)
        batch, columns = DialogueBatch(model, eos, pad=0), []

        def counted(self, tokens, *args):
            columns.append(tokens.numel() if tokens.shape[1] > 1 else 0)
            return forward(self, tokens, *args)

        monkeypatch.setattr(DialogueBatch, "_forward", counted)
        one, _ = batch.answer([None] * 4, first, [3, 2, 3, 8])
        second_prompts = [first[2] + one[2] + list(range(70, 95)), list(range(5, 8)), first[0] + one[0] + [9],
                          first[3] + one[3] + [4, 5]]
        two, _ = batch.answer([2, None, 0, 3], second_prompts, [4, 2, 4, 9])
        assert batch.valid.sum(1).tolist() == batch.cached  # every row's real columns, packed
        return one + two, sum(columns)

    grouped, grouped_columns = run(4)
    single, single_columns = run(1)
    assert grouped == single
    assert grouped_columns < single_columns


def test_dialogue_batch_refuses_a_prompt_that_does_not_extend_its_row(llama):
    batch = DialogueBatch(llama.model, sorted(llama.eos_token_ids), pad=0)
    [answer], _ = batch.answer([None], [[20, 21, 22]], [2])
    with pytest.raises(ValueError, match="does not extend"):
        batch.answer([0], [[20, 21]], [2])
    with pytest.raises(ValueError, match="one row and one budget per prompt"):
        batch.answer([0, None], [[20, 21, 22] + answer + [5]], [2])
