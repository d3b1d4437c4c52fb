import json

import pytest
import torch

from falconspec.data import (
    Conversation, GenDataConfig, ShardDataset, format_conversation, generate_dataset, is_heldout, iter_json_array,
    load_conversations, parse_record, self_distill, sharegpt_split,
)
from falconspec.testing import save_tiny_model, tiny_target

CONV = Conversation("x", [
    {"role": "system", "content": "be nice"},
    {"role": "user", "content": "hi"},
    {"role": "assistant", "content": "hello!"},
    {"role": "user", "content": "more"},
    {"role": "assistant", "content": "ok."},
])


def masked_text(tokenizer, sample, value=1):
    return tokenizer.decode([i for i, m in zip(sample.input_ids, sample.loss_mask) if m == value])


def test_loss_mask_covers_assistant_turns_only(llama):
    sample = format_conversation(llama.tokenizer, CONV, max_len=1000)
    assert sample.input_ids == llama.tokenizer.apply_chat_template(CONV.messages, tokenize=True, return_dict=False)
    assert masked_text(llama.tokenizer, sample) == "hello!<|im_end|>\nok.<|im_end|>\n"
    assert "be nice" in masked_text(llama.tokenizer, sample, 0) and "hello" not in masked_text(llama.tokenizer, sample, 0)


def test_truncation_and_no_assistant_left(llama):
    full = format_conversation(llama.tokenizer, CONV, max_len=1000)
    cut = format_conversation(llama.tokenizer, CONV, max_len=len(full.input_ids) - 3)
    assert cut.input_ids == full.input_ids[:-3] and cut.loss_mask == full.loss_mask[:-3]
    assert format_conversation(llama.tokenizer, CONV, max_len=20) is None  # only the system turn survives


def test_parse_sharegpt_and_openai_records():
    share = parse_record({"id": "a_1", "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "r"}]}, 0)
    openai = parse_record({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]}, 1)
    assert share.messages == openai.messages == [{"role": "user", "content": "q"}, {"role": "assistant", "content": "r"}]
    assert share.id == "a_1" and len(openai.id) == 16
    with pytest.raises(ValueError, match="record 3"):
        parse_record({"text": "no turns"}, 3)
    with pytest.raises(ValueError, match="known 'from'"):
        parse_record({"conversations": [{"from": "robot", "value": "q"}]}, 0)


def test_streaming_parser_recovers_a_truncated_file(tmp_path):
    records = [{"id": str(i), "conversations": [{"from": "human", "value": "x" * (i * 37)}]} for i in range(30)]
    text = json.dumps(records, indent=1)
    path = tmp_path / "cut.json"
    path.write_text(text[: text.index('"x' + "x" * (29 * 37 - 10))])  # cut inside the last record's string
    got = list(iter_json_array(path, chunk_chars=64))  # tiny chunks: records span many reads
    assert got == records[:29]
    path.write_text(text)
    assert list(iter_json_array(path, chunk_chars=64)) == records
    path.write_text(text.replace('"id": "5"', '"id": 5x', 1))
    with pytest.raises(ValueError, match="malformed JSON after record 5"):
        list(iter_json_array(path))
    path.write_text('{"conversations": []}')
    with pytest.raises(ValueError, match="JSON array"):
        list(iter_json_array(path))


def test_load_conversations_files_and_errors(tmp_path):
    path = tmp_path / "c.jsonl"
    lines = [{"messages": [{"role": "assistant", "content": "starts with the bot"}]},
             {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    assert [c.messages[0]["content"] for c in load_conversations(str(path))] == ["q"]
    with pytest.raises(FileNotFoundError, match="not found"):
        load_conversations(str(tmp_path / "missing.json"))
    path.write_text('{"messages": [}\n')
    with pytest.raises(ValueError, match="c.jsonl:1"):
        load_conversations(str(path))


def test_question_records_are_user_turns_and_need_no_answer_for_self_distillation(tmp_path):
    path = tmp_path / "questions.jsonl"
    lines = [{"question_id": 81, "category": "writing", "turns": ["first", "second"]}, {"turns": ["only"]}]
    path.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    convs = load_conversations(str(path), need_answer=False)
    assert [c.id for c in convs][0] == "81" and len(convs[1].id) == 16
    assert convs[0].messages == [{"role": "user", "content": "first"}, {"role": "user", "content": "second"}]
    with pytest.raises(ValueError, match="contains an assistant turn"):
        load_conversations(str(path))  # fixed-answer data needs the dataset's answers
    with pytest.raises(ValueError, match="record 0: 'turns' must be"):
        parse_record({"turns": ["ok", " "]}, 0)
    mt_bench = load_conversations("mt-bench", need_answer=False)
    assert len(mt_bench) == 80 and all(len(c.messages) == 2 for c in mt_bench)


def test_sharegpt_package_streams_first_records():
    convs = load_conversations("sharegpt", limit=5)
    assert len(convs) == 5 and convs[0].messages[0]["role"] == "user"


def test_split_rule_is_deterministic_and_keeps_chat_parts_together():
    ids = [f"conv{i}_{part}" for i in range(400) for part in range(2)]
    held = [is_heldout(i) for i in ids]
    assert held[0::2] == held[1::2]  # both parts of a chat on the same side
    assert 0.02 < sum(held) / len(held) < 0.09  # ~5 %
    convs = [Conversation(i, []) for i in ids]
    train, heldout = sharegpt_split(convs, "train"), sharegpt_split(convs, "heldout")
    assert len(train) + len(heldout) == len(ids) and not {c.id for c in train} & {c.id for c in heldout}
    assert [c.id for c in sharegpt_split(convs[::-1], "heldout")] == [c.id for c in heldout][::-1]


def test_self_distill_answers_are_the_targets_greedy_tokens(llama):
    convs = [Conversation("a", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}]),
             Conversation("b", [{"role": "user", "content": "a longer question"}, {"role": "assistant", "content": "y"}])]
    samples = self_distill(llama.model, llama.tokenizer, convs, max_len=200, max_new_tokens=12)
    for sample in samples:
        prompt = [i for i, m in zip(sample.input_ids, sample.loss_mask) if not m]
        alone = llama.model.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0, len(prompt):]
        assert sample.loss_mask == [0] * len(prompt) + [1] * len(alone)
        assert sample.input_ids[len(prompt):] == alone.tolist()


def write_convs(path, n):
    convs = [{"id": f"c{i}", "conversations": [{"from": "human", "value": f"question {i}"},
                                               {"from": "gpt", "value": f"answer number {i}!"}]} for i in range(n)]
    path.write_text(json.dumps(convs))


def test_a_larger_limit_grows_a_dataset(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    write_convs(tmp_path / "c.json", 6)
    cfg = GenDataConfig(model=str(model_dir), source=str(tmp_path / "c.json"), out=str(tmp_path / "d"), split="all",
                        shard_size=2, max_len=64, limit=4)
    assert generate_dataset(cfg) == 2
    assert generate_dataset(GenDataConfig(**{**cfg.__dict__, "limit": 6})) == 1
    assert ShardDataset(tmp_path / "d").ids == [f"c{i}" for i in range(6)]


def test_shards_round_trip_and_resume(tmp_path):
    model_dir = save_tiny_model(tmp_path / "tiny")
    write_convs(tmp_path / "c.json", 5)
    cfg = GenDataConfig(model=str(model_dir), source=str(tmp_path / "c.json"), out=str(tmp_path / "d"), split="all",
                        shard_size=2, max_len=64)
    assert generate_dataset(cfg) == 3
    data = ShardDataset(tmp_path / "d")
    assert data.ids == [f"c{i}" for i in range(5)]
    target = tiny_target("llama")  # the same weights as save_tiny_model
    for sample in data:
        ids = sample["input_ids"].long()
        with torch.no_grad():
            hidden = target.decoder(input_ids=ids[None]).last_hidden_state[0]
        torch.testing.assert_close(sample["hidden_states"].float(), hidden, atol=2e-3, rtol=2e-3)
        assert torch.equal(sample["target_tokens"].long(), target.lm_head(hidden).argmax(-1))
        assert 0 < sample["loss_mask"].sum() < len(ids)
    shard = tmp_path / "d" / "shard_00001.safetensors"
    before = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d").glob("shard_*")}
    shard.unlink()
    assert generate_dataset(cfg) == 1  # only the missing shard is redone
    after = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "d").glob("shard_*")}
    assert after["shard_00000.safetensors"] == before["shard_00000.safetensors"] and shard.exists()
    assert generate_dataset(cfg) == 0
    with pytest.raises(ValueError, match="other settings.*max_len"):
        generate_dataset(GenDataConfig(**{**cfg.__dict__, "max_len": 32}))
    with pytest.raises(ValueError, match="other settings.*limit"):  # 5 is not a whole number of shards
        generate_dataset(GenDataConfig(**{**cfg.__dict__, "limit": 3}))
    with pytest.raises(FileNotFoundError, match="gen-data"):
        ShardDataset(tmp_path)
