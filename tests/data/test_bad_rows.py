"""Bad rows of a file or hub dataset: named by their place in the file (counted from 1, as an editor shows
it), refused or dropped and counted (data.bad_rows), checked without a tokenizer before any model loads,
each row's checks run once per process. And a tokenizer without a pad token, or without a chat template."""

import json
import os

import pytest

from kltd.data import checkers
from kltd.data.chat import PLAIN_MESSAGES
from kltd.data.formats import DataError
from kltd.data.prepare import prepare
from kltd.data.rows import check_rows
from kltd.schema.config import Config, ConfigError, DataConfig, DataFields
from tests.support.fixtures import GSM8K, chat_tokenizer, conversational_dir


def config(path, **changes) -> DataConfig:
    cfg = DataConfig(source="file", path=str(path), **changes)
    cfg.check()
    return cfg


def good_rows(n: int = 12) -> list[dict]:
    return [{"prompt": f"What is {i}+1?", "completion": f"{i + 1}"} for i in range(n)]


def write_jsonl(path, rows, blank_lines=()):
    """One row a line, with a blank line before each row index in `blank_lines`."""
    path.write_text("".join(("\n" if i in blank_lines else "") + json.dumps(r) + "\n" for i, r in enumerate(rows)))
    return path


def refusal(cfg) -> str:
    with pytest.raises(DataError) as refused:
        prepare(cfg, chat_tokenizer(), needs_responses=False)
    message = str(refused.value)
    assert "\n" not in message and "data.bad_rows=drop" in message
    return message


@pytest.mark.parametrize("part", ["train", "held out"])
def test_a_jsonl_row_is_named_by_its_line_in_the_file(tmp_path, part):
    """A blank line (line 3) and a held-out fraction: the row's line is neither its index in the file's rows
    nor its position in the part it ends up in."""
    path = tmp_path / "train.jsonl"
    cfg = config(write_jsonl(path, good_rows(), blank_lines={2}), eval_fraction=0.25, seed=0)
    held_out = prepare(cfg, chat_tokenizer(), needs_responses=True).held_out
    candidates = held_out if part == "held out" else [i for i in range(12) if i not in held_out]
    index = candidates[-1]
    position = candidates.index(index)
    line = index + 1 + (index >= 2)  # rows 0 and 1 on lines 1 and 2, line 3 blank
    assert len({position, index, line - 1}) == 3
    rows = good_rows()
    rows[index]["completion"] = ""
    write_jsonl(path, rows, blank_lines={2})
    assert refusal(cfg).startswith(f"{path}:{line}: empty response; ")


def test_a_jsonl_value_of_another_kind_than_its_column_is_named_by_its_line(tmp_path):
    """datasets would read such a column as JSON and turn every number-like text ("2") into a number."""
    rows = good_rows()
    rows[6]["completion"] = 7
    path = write_jsonl(tmp_path / "train.jsonl", rows, blank_lines={2})
    with pytest.raises(DataError, match=f"^{path}:8: 'completion' must be text as on the other lines, got a number"):
        prepare(config(path), chat_tokenizer(), needs_responses=True)


def test_csv_cells_are_text_even_when_they_look_like_numbers(tmp_path):
    path = tmp_path / "sums.csv"
    path.write_text("prompt,completion\n" + "".join(f"{i}+1,{i + 1}.50\n" for i in range(10)))
    data = prepare(config(path, checker="exact", eval_split="train"), chat_tokenizer(), needs_responses=True)
    assert data.train[0].response == "1.50" and data.train[0].answer == "1.50"


def test_a_csv_row_is_named_by_the_line_it_starts_on(tmp_path):
    path = tmp_path / "rows.csv"
    # line 1 the header, a quoted field over lines 2-3, line 4 blank, line 5 a row with an empty completion
    path.write_text('prompt,completion\na,"one\ntwo"\n\nb,\nc,d\n')
    assert refusal(config(path, eval_split="train")).startswith(f"{path}:5: empty response")


def test_a_parquet_row_and_a_split_row_are_named_by_their_row_in_the_split(tmp_path):
    import datasets

    rows = good_rows()
    rows[7]["prompt"] = ""
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "data.parquet"))
    message = refusal(config(tmp_path / "data.parquet", eval_fraction=0.5, seed=1))
    assert message.startswith(f"{tmp_path / 'data.parquet'} [train] row 8: empty prompt; ")
    repo = tmp_path / "repo"  # a hub dataset's layout: the row is named in its own split
    repo.mkdir()
    write_jsonl(repo / "train.jsonl", good_rows())
    write_jsonl(repo / "test.jsonl", [*good_rows(2), {"prompt": "q", "completion": " "}])
    cfg = DataConfig(source="hub", path=str(repo), eval_split="test")
    cfg.check()
    assert refusal(cfg).startswith(f"{repo} [test] row 3: empty response")


def conversation(i: int) -> dict:
    return {"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}


def conversational_pair(i: int) -> dict:
    return {"prompt": [{"role": "user", "content": f"q{i}"}], "completion": [{"role": "assistant", "content": "a"}]}


@pytest.mark.parametrize("like,row,problem", [
    (good_rows, {"prompt": "  ", "completion": "x"}, "empty prompt"),
    (good_rows, {"prompt": "q", "completion": ""}, "empty response"),
    (conversation, {"messages": [{"role": "system", "content": ""}, {"role": "user", "content": " \n"},
                                 {"role": "assistant", "content": "x"}]}, "empty prompt"),
    (conversation, {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "\n"}]},
     "empty response"),
    (conversational_pair, {"prompt": [{"role": "user", "content": "q"}],
                           "completion": [{"role": "assistant", "content": ""}]}, "empty response"),
])
def test_empty_prompts_and_responses_are_refused(tmp_path, like, row, problem):
    rows = good_rows() if like is good_rows else [like(i) for i in range(12)]
    path = write_jsonl(tmp_path / "rows.jsonl", rows[:4] + [row] + rows[4:])
    assert refusal(config(path, eval_split="train")).startswith(f"{path}:5: {problem}")


def test_named_columns_refuse_an_empty_question(tmp_path):
    rows = [{"question": q, "answer": a} for q, a in GSM8K]
    rows[3]["question"] = ""
    path = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    cfg = config(path, eval_split="train", fields=DataFields(prompt="question", response="answer"))
    assert refusal(cfg).startswith(f"{path}:4: empty prompt")


def test_bad_rows_dropped_are_counted_by_reason(tmp_path):
    rows = good_rows(20)
    rows[1]["prompt"] = rows[5]["prompt"] = ""
    rows[8]["completion"] = " "
    rows[13]["completion"] = None
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    data = prepare(config(path, bad_rows="drop"), chat_tokenizer(), needs_responses=True)
    assert len(data.train) + len(data.eval) == 16
    assert data.summary["bad_rows_dropped"] == {"empty prompt": 2, "empty response": 2}
    assert data.summary["bad_rows"] == "drop"
    assert all(e.prompt.strip() and e.response.strip() for e in data.train + data.eval)


def test_a_split_whose_every_row_is_bad_is_refused_in_one_line(tmp_path):
    rows = [{"prompt": "", "completion": "x"}] * 10
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    with pytest.raises(DataError, match=r"every row of the train split is bad \(empty prompt: 10\)"):
        prepare(config(path, bad_rows="drop", eval_split="train"), chat_tokenizer(), needs_responses=True)


def test_answers_the_checker_cannot_read_suggest_another_checker_or_are_dropped(tmp_path):
    """The competition-math case: answers that are expressions, read with the GSM8K checker."""
    rows = [{"question": q, "answer": a} for q, a in GSM8K]
    rows += [{"question": f"Simplify expression {i}.", "answer": "The answer is $\\boxed{x+y}$."} for i in range(18)]
    path = write_jsonl(tmp_path / "math.jsonl", rows)
    fields = DataFields(prompt="question", response="answer")
    message = refusal(config(path, fields=fields, checker="gsm8k", eval_split="train", n_train=100))
    assert message.startswith(f"{path}:7: no number in the answer")
    assert "try data.checker=boxed or data.checker=exact" in message
    data = prepare(config(path, fields=fields, checker="gsm8k", bad_rows="drop"), chat_tokenizer(),
                   needs_responses=True)
    assert data.summary["bad_rows_dropped"] == {"no number in the answer": 18}
    assert len(data.train) + len(data.eval) == len(GSM8K)


def test_bad_rows_is_checked_like_the_other_keys():
    with pytest.raises(ConfigError, match="data.bad_rows='skip' is not valid; choose one of: error, drop"):
        DataConfig(source="file", path="x.jsonl", bad_rows="skip").check()


def test_preflight_refuses_a_bad_row_before_a_tokenizer_or_model_is_loaded(tmp_path):
    from kltd.train.preflight import preflight

    rows = good_rows()
    rows[2]["completion"] = ""
    path = write_jsonl(tmp_path / "rows.jsonl", rows)
    cfg = Config(data=config(path))
    with pytest.raises(ConfigError, match=f"^{path}:3: empty response"):
        preflight(cfg)
    cfg.data.bad_rows = "drop"
    preflight(cfg)


def test_preflight_refuses_prompt_only_data_for_fixed_states_before_any_model_loads(tmp_path):
    from kltd.train.preflight import preflight

    path = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": f"question {i}"} for i in range(10)])
    with pytest.raises(ConfigError, match="prompt-only rows, but these states are the dataset's responses"):
        preflight(Config(data=config(path)))  # prefix=fixed: the states are the responses
    sampled = Config(data=config(path))
    sampled.prefix.source, sampled.trajectory.supervisor = "student", "student"
    preflight(sampled)


def test_each_row_is_checked_once_per_process_until_the_file_changes(tmp_path, monkeypatch):
    """math-verify takes milliseconds a row: preflight (for each job of a sweep, then in the job) and prepare()
    share one check of each row."""
    calls = []
    gsm8k = checkers.CHECKERS["gsm8k"]

    def counted(text):
        calls.append(text)
        return gsm8k.reference(text)

    monkeypatch.setitem(checkers.CHECKERS, "gsm8k", checkers.Checker("gsm8k", counted, gsm8k.check, gsm8k.unreadable))
    path = write_jsonl(tmp_path / "g.jsonl", [{"question": q, "answer": a} for q, a in GSM8K * 4])
    cfg = config(path, fields=DataFields(prompt="question", response="answer"), checker="gsm8k")
    check_rows(cfg)
    check_rows(cfg)
    first = prepare(cfg, chat_tokenizer(), needs_responses=True)
    prepare(cfg, chat_tokenizer(), needs_responses=True)
    assert len(calls) == 24
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # edited: read and checked afresh
    again = prepare(cfg, chat_tokenizer(), needs_responses=True)
    assert len(calls) == 48 and again.held_out == first.held_out


def test_a_tokenizer_without_a_pad_token_pads_with_its_end_token_and_masks_stay_by_length(tmp_path):
    from kltd.rollout.batch import encode_prompts, encode_responses

    path = write_jsonl(tmp_path / "rows.jsonl", good_rows())
    plain = chat_tokenizer(template=False)
    plain.pad_token = None
    assert plain.pad_token is None
    data = prepare(config(path), plain, needs_responses=True)
    assert plain.pad_token == plain.eos_token == data.end_token == "<|endoftext|>"
    responses = encode_responses(plain, ["1", "12345"], "cpu")  # the short one is padded with the end token
    assert responses.tokens[0].tolist().count(plain.eos_token_id) == 5
    assert responses.mask.sum(1).tolist() == [2, 6]  # its own end token supervised, the padding not
    _, prompt_mask = encode_prompts(plain, ["ab", "abcd"], "cpu")
    assert prompt_mask.sum(1).tolist() == [2, 4]
    templated = chat_tokenizer()
    templated.pad_token = templated.eos_token = None  # neither: the template's end of turn serves both
    prepare(config(path), templated, needs_responses=True)
    assert templated.pad_token == templated.eos_token == "<|im_end|>"


def test_conversations_without_a_chat_template_are_joined_as_plain_text_and_say_so(tmp_path):
    conv = conversational_dir(tmp_path / "conv", split_dict=False)
    data = prepare(config(conv), chat_tokenizer(template=False), needs_responses=True)
    assert data.summary["notes"] == [PLAIN_MESSAGES]
    assert data.train[0].prompt.startswith("Answer briefly.\n\n")
    assert prepare(config(conv, chat_template="none"), chat_tokenizer(template=False),
                   needs_responses=True).summary["notes"] == []
    assert prepare(config(conv), chat_tokenizer(), needs_responses=True).summary["notes"] == []
    text = write_jsonl(tmp_path / "text.jsonl", good_rows())  # plain-text prompts need no template
    assert prepare(config(text), chat_tokenizer(template=False), needs_responses=True).summary["notes"] == []
