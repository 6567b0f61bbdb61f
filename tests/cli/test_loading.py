"""Names to objects: built-ins offline, local files and folders through `datasets.load_dataset`."""

import json

import pytest
import torch
from datasets import Dataset

from sapo.cli.arguments import DataArguments, ModelArguments
from sapo.cli.loading import check_rows, load_model, load_rows, load_tokenizer, lora_config

CONVERSATION = [{"role": "user", "content": "1+1="}, {"role": "assistant", "content": "2"}]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_builtin_task_splits():
    assert len(load_rows(DataArguments("builtin:multiplication", "validation"))) == 500
    with pytest.raises(ValueError, match="dataset_split: unknown split 'dev'"):
        load_rows(DataArguments("builtin:addition", "dev"))


def test_local_jsonl_parquet_and_folder(tmp_path):
    rows = [{"messages": CONVERSATION}] * 3
    assert len(load_rows(DataArguments(write_jsonl(tmp_path / "a.jsonl", rows)))) == 3
    Dataset.from_list(rows * 2).to_parquet(str(tmp_path / "b.parquet"))
    assert len(load_rows(DataArguments(str(tmp_path / "b.parquet")))) == 6
    folder = tmp_path / "folder"
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows)
    write_jsonl(folder / "test.jsonl", rows[:1])
    assert len(load_rows(DataArguments(str(folder), "test"))) == 1


def test_local_file_errors_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="dataset_name: no such file or folder: .*nope.jsonl"):
        load_rows(DataArguments(str(tmp_path / "nope.jsonl")))
    (tmp_path / "rows.csv").write_text("prompt,completion\n1+1=,2\n")
    with pytest.raises(ValueError, match=r"rows.csv: expected a .json, .jsonl, .parquet file or a folder"):
        load_rows(DataArguments(str(tmp_path / "rows.csv")))
    (tmp_path / "broken.json").write_text('{"messages": [')
    with pytest.raises(ValueError, match="dataset_name: cannot load .*broken.json"):
        load_rows(DataArguments(str(tmp_path / "broken.json")))


def test_messages_column_is_renamed_and_others_dropped(tmp_path):
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"chosen": CONVERSATION, "prompt": "1+1=", "rating": 5}])
    dataset = load_rows(DataArguments(path, messages_column="chosen"))
    assert dataset.column_names == ["messages"] and dataset[0]["messages"] == CONVERSATION
    with pytest.raises(ValueError, match="messages_column: .* has no column 'chosn'; did you mean 'chosen'"):
        load_rows(DataArguments(path, messages_column="chosn"))


def test_check_rows_names_the_first_bad_row():
    check_rows(Dataset.from_list([{"messages": CONVERSATION}]), "good")
    with pytest.raises(ValueError, match="dataset_name: empty has no rows"):
        check_rows(Dataset.from_list([]), "empty")
    bad = Dataset.from_list([{"prompt": "a", "completion": "b"}, {"prompt": "a", "completion": "  "}])
    with pytest.raises(ValueError, match="dataset_name: bad: row 1: .*the gold answer is empty"):
        check_rows(bad, "bad")


def test_builtin_models_and_tokenizer():
    tiny = ModelArguments("builtin:tiny")
    tokenizer = load_tokenizer(tiny)
    first, again = load_model(tiny, tokenizer, seed=5), load_model(tiny, tokenizer, seed=5)
    assert all(torch.equal(a, b) for a, b in zip(first.parameters(), again.parameters()))
    small = load_model(ModelArguments("builtin:small", torch_dtype="bfloat16"), tokenizer)
    assert small.dtype == torch.bfloat16 and small.config.num_hidden_layers == 4
    shipped = load_model(ModelArguments("builtin:tiny-multiplication-sft"), tokenizer)
    assert shipped.config.vocab_size == len(tokenizer)


def test_chat_template_from_a_string_or_a_file(tmp_path):
    template = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    tokenizer = load_tokenizer(ModelArguments("builtin:tiny", chat_template=template))
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == "[1+1=][2]"
    (tmp_path / "chat.jinja").write_text(template)
    tokenizer = load_tokenizer(ModelArguments("builtin:tiny", chat_template=str(tmp_path / "chat.jinja")))
    assert tokenizer.chat_template == template
    with pytest.raises(ValueError, match="chat_template: neither a Jinja template nor an existing file"):
        load_tokenizer(ModelArguments("builtin:tiny", chat_template=str(tmp_path / "missing.jinja")))


def test_lora_config_follows_the_flags():
    assert lora_config(ModelArguments("m")) is None
    config = lora_config(
        ModelArguments("m", use_peft=True, lora_r=8, lora_alpha=16, lora_target_modules=["all-linear"])
    )
    assert (config.r, config.lora_alpha, config.target_modules) == (8, 16, "all-linear")
    config = lora_config(ModelArguments("m", use_peft=True, lora_target_modules=["q_proj", "v_proj"]))
    assert config.target_modules == {"q_proj", "v_proj"}
