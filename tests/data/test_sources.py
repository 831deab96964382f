"""Files and directories through `datasets`, in TRL's formats or named columns; splits; bad rows named."""

import json

import pytest

from kltd.data.formats import DataError
from kltd.data.prepare import prepare
from kltd.schema.config import DataConfig, DataFields
from tests.support.fixtures import GSM8K, chat_tokenizer, conversational_dir, gsm8k_jsonl, math_parquet


def config(path, **changes) -> DataConfig:
    cfg = DataConfig(source="file", path=str(path), **changes)
    cfg.check()
    return cfg


GSM8K_FIELDS = dict(fields=DataFields(prompt="question", response="answer"), checker="gsm8k")


def test_gsm8k_jsonl_with_named_columns_and_a_held_out_fraction(tmp_path):
    tok = chat_tokenizer()
    data = prepare(config(gsm8k_jsonl(tmp_path / "gsm8k.jsonl"), eval_fraction=0.25, seed=3, **GSM8K_FIELDS), tok,
                   needs_responses=True)
    assert len(data.train) + len(data.eval) == 24 and len(data.eval) == 6
    assert sorted(data.held_out) == data.held_out and len(set(data.held_out)) == 6
    again = prepare(config(tmp_path / "gsm8k.jsonl", eval_fraction=0.25, seed=3, **GSM8K_FIELDS), tok,
                    needs_responses=True)
    assert again.held_out == data.held_out  # seeded
    other = prepare(config(tmp_path / "gsm8k.jsonl", eval_fraction=0.25, seed=4, **GSM8K_FIELDS), tok,
                    needs_responses=True)
    assert other.held_out != data.held_out
    # the template is applied to the prompt; the answer is read from the reference response
    first = data.train[0]
    assert first.prompt.startswith("<|im_start|>user\n") and first.prompt.endswith("<|im_start|>assistant\n")
    assert first.answer is not None and first.response.rstrip().endswith(f"#### {first.answer}".replace(",", ""))
    assert tok.eos_token == "<|im_end|>"  # responses end with the token the template closes a turn with
    assert data.summary["format"] == "named columns" and data.summary["checker"] == "gsm8k"


def test_math_parquet_and_a_system_prompt(tmp_path):
    tok = chat_tokenizer()
    cfg = config(math_parquet(tmp_path / "math.parquet"), fields=DataFields(prompt="problem", response="solution"),
                 checker="boxed", system_prompt="Put the answer in \\boxed{}.")
    data = prepare(cfg, tok, needs_responses=True)
    assert data.train[0].prompt.startswith("<|im_start|>system\nPut the answer in \\boxed{}.<|im_end|>")
    assert all(e.answer for e in data.train + data.eval)


@pytest.mark.parametrize("split_dict", [True, False])
def test_conversational_save_to_disk_directories(tmp_path, split_dict):
    tok = chat_tokenizer()
    cfg = config(conversational_dir(tmp_path / "conv", split_dict=split_dict), checker="gsm8k",
                 eval_split="test" if split_dict else None)
    data = prepare(cfg, tok, needs_responses=True)
    assert len(data.eval) == (3 if split_dict else 3)  # the test split; or 10% of 24 rows, rounded up
    assert "<|im_start|>system\nAnswer briefly.<|im_end|>" in data.train[0].prompt
    assert data.train[0].response in {a for _, a in GSM8K}
    assert data.summary["format"] == "conversational (messages)"


def test_standard_prompt_completion_rows_and_plain_text_without_a_template(tmp_path):
    path = tmp_path / "std.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"{i}+1=", "completion": f"{i + 1}"}) + "\n" for i in range(20)))
    tok = chat_tokenizer(template=False)
    data = prepare(config(path, checker="exact"), tok, needs_responses=True)
    assert {e.prompt for e in data.train} <= {f"{i}+1=" for i in range(20)}  # untouched: no template
    assert all(e.answer == e.response for e in data.train)
    tok = chat_tokenizer()
    data = prepare(config(path, chat_template="none"), tok, needs_responses=True)
    assert not data.train[0].prompt.startswith("<|im_start|>") and tok.eos_token == "<|endoftext|>"


def test_csv_and_token_limits_drop_or_truncate_and_are_counted(tmp_path):
    path = tmp_path / "rows.csv"
    path.write_text("prompt,completion\n" + "".join(f"{'x' * (i % 5 + 1)},{'y' * (i % 7 + 1)}\n" for i in range(40)))
    tok = chat_tokenizer(template=False)
    dropped = prepare(config(path, max_prompt_tokens=3, max_response_tokens=5), tok, needs_responses=True)
    kept = [e for e in dropped.train + dropped.eval]
    assert all(len(e.prompt) <= 3 and len(e.response) <= 4 for e in kept)
    assert dropped.summary["dropped"] > 0 and dropped.summary["truncated"] == 0
    cut = prepare(config(path, max_prompt_tokens=3, max_response_tokens=5, overflow="truncate"), tok,
                  needs_responses=True)
    assert len(cut.train) + len(cut.eval) == 40 and cut.summary["truncated"] > 0
    assert all(len(e.prompt) <= 3 and len(e.response) <= 4 for e in cut.train + cut.eval)


@pytest.mark.parametrize("content,message", [
    ('{"prompt": "a", "completion": "b"}\n{"prompt": 3, "completion": "c"}\n',
     "rows.jsonl:2: 'prompt' must be text as on the other lines, got a number"),
    ('{"prompt": "a", "completion": "b"}\nnot json\n', "rows.jsonl:2: not valid JSON"),
    ('{"question": "a", "answer": "b"}\n', "data.fields.prompt"),
    ('{"messages": [{"role": "user"}]}\n', "list of messages"),
])
def test_bad_rows_are_named(tmp_path, content, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(content * 1)
    with pytest.raises(DataError, match=message.replace("(", "\\(")):
        prepare(config(path, eval_split="train"), chat_tokenizer(), needs_responses=True)


def test_not_utf8_missing_splits_unknown_types_and_unreadable_answers(tmp_path):
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "caf\xe9", "completion": "x"}\n'.encode("latin-1"))
    with pytest.raises(DataError, match="latin.jsonl: not UTF-8"):
        prepare(config(latin), chat_tokenizer(), needs_responses=True)
    with pytest.raises(DataError, match="no split 'validation'.*train"):
        prepare(config(gsm8k_jsonl(tmp_path / "g.jsonl"), eval_split="validation", **GSM8K_FIELDS), chat_tokenizer(),
                needs_responses=True)
    odd = tmp_path / "rows.txt"
    odd.write_text("x")
    with pytest.raises(DataError, match="unknown file type"):
        prepare(config(odd), chat_tokenizer(), needs_responses=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "no number here"}) + "\n")
    with pytest.raises(DataError, match=r"bad.jsonl:1: no number"):
        prepare(config(bad, eval_split="train", **GSM8K_FIELDS), chat_tokenizer(), needs_responses=True)


def test_prompt_only_rows_serve_sampled_states_but_not_fixed_ones(tmp_path):
    path = tmp_path / "prompts.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"question {i}"}) + "\n" for i in range(10)))
    data = prepare(config(path), chat_tokenizer(), needs_responses=False)
    assert all(e.response is None for e in data.train)
    with pytest.raises(DataError, match="prompt-only"):
        prepare(config(path), chat_tokenizer(), needs_responses=True)


def test_the_hub_path_reads_a_dataset_laid_out_like_a_hub_repository(tmp_path):
    """data=hub goes through datasets.load_dataset like any hub name; a local folder in a hub repository's
    layout (one file per split) stands in for the network here."""
    repo = tmp_path / "repo"
    repo.mkdir()
    for split, rows in (("train", GSM8K * 3), ("test", GSM8K[:2])):
        (repo / f"{split}.jsonl").write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    cfg = DataConfig(source="hub", path=str(repo), eval_split="test", **GSM8K_FIELDS)
    cfg.check()
    data = prepare(cfg, chat_tokenizer(), needs_responses=True)
    assert (len(data.train), len(data.eval)) == (18, 2) and data.summary["eval_split"] == "test"
