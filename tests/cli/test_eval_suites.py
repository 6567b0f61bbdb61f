"""`sapo eval --suite lm-eval`, `sapo generate` and `sapo train --eval_dataset`, end to end and
offline: lm-evaluation-harness on local tasks written here, the judges' answer files, evaluation
and pairs.jsonl while training; bad input exits 2 with one line naming it."""

import contextlib
import io
import json
import sys

import pytest
from datasets import Dataset
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

import sapo.evaluation.answers
from sapo.builtin.tasks import task_dataset
from sapo.builtin.tiny import tiny_llama
from sapo.cli import main
from sapo.cli.arguments import ModelArguments
from sapo.cli.evaluate import evaluation_model, evaluation_tokenizer
from sapo.cli.loading import load_model, load_tokenizer
from sapo.data import GOLD_IDS, PROMPT_IDS, prepare_dataset
from sapo.evaluation import greedy_accuracy
from sapo.policy import eos_token_ids

MODEL = "builtin:tiny-multiplication-sft"
PROBLEMS = [
    (row["prompt"][0]["content"], row["completion"][0]["content"])
    for row in task_dataset("multiplication", "test").select(range(8))
]

GENERATE_TASK = """\
task: mult_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{question}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["<|end|>"]
  max_gen_toks: 8
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
"""
CHOICE_TASK = """\
task: mult_choice
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        monkeypatch.setenv(name, "1")


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    """A generate_until task scored by exact match and a multiple_choice task scored by accuracy,
    whose wrong choices are letters (a multiplication model never writes them)."""
    folder = tmp_path_factory.mktemp("lm_tasks")
    (folder / "gen.jsonl").write_text(
        "".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in PROBLEMS)
    )
    choices = [
        {"question": q, "choices": ["x" * len(a), a, "q" * len(a)], "label": 1} for q, a in PROBLEMS[:4]
    ]
    (folder / "choice.jsonl").write_text("".join(json.dumps(doc) + "\n" for doc in choices))
    (folder / "mult_gen.yaml").write_text(GENERATE_TASK.format(data=folder / "gen.jsonl"))
    (folder / "mult_choice.yaml").write_text(CHOICE_TASK.format(data=folder / "choice.jsonl"))
    return folder


def run(argv):
    """Exit status, stdout and stderr of ``sapo argv``."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main(argv)
    return status, out.getvalue(), err.getvalue()


def error_line(argv):
    status, _, err = run(argv)
    lines = [line for line in err.splitlines() if line.strip()]
    assert status == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def lm_eval_run(tasks_dir, tmp_path_factory):
    output = tmp_path_factory.mktemp("lm_eval_results")
    argv = ["eval", "--model_name_or_path", MODEL, "--suite", "lm-eval", "--tasks", "mult_gen,mult_choice",
            "--include_path", str(tasks_dir), "--apply_chat_template", "--batch_size", "4",
            "--output_dir", str(output)]  # fmt: skip
    status, out, _ = run(argv)
    assert status == 0
    return out, output


def test_lm_eval_prints_a_table_and_ends_with_one_json_line(lm_eval_run):
    out, output = lm_eval_run
    last = json.loads(out.strip().splitlines()[-1])
    assert last["suite"] == "lm-eval" and set(last["results"]) == {"mult_gen", "mult_choice"}
    assert 0.0 <= last["results"]["mult_gen"]["exact_match,none"] <= 1.0
    assert last["results"]["mult_choice"]["acc,none"] == 1.0
    assert "exact_match" in out and "|mult_choice" in out  # the harness's table
    full = json.loads((output / "results.json").read_text())
    assert full["results"]["mult_gen"]["exact_match,none"] == last["results"]["mult_gen"]["exact_match,none"]
    assert {"configs", "versions", "n-shot"} <= set(full)


def test_lm_eval_exact_match_is_sapos_greedy_exact_match(lm_eval_run):
    """The harness's generate_until task, chat template applied, scores what sapo's own greedy
    exact match scores on the same problems."""
    out, _ = lm_eval_run
    harness = json.loads(out.strip().splitlines()[-1])["results"]["mult_gen"]["exact_match,none"]
    model_args = ModelArguments(model_name_or_path=MODEL)
    tokenizer = load_tokenizer(model_args)
    model = load_model(model_args, tokenizer).eval()
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in PROBLEMS
    ]
    data = prepare_dataset(Dataset.from_list(rows), tokenizer, 32, 24)
    pairs = list(zip(data[PROMPT_IDS], data[GOLD_IDS]))
    ours = greedy_accuracy(model, pairs, tokenizer.pad_token_id, eos_token_ids(model, tokenizer))
    assert 0.0 < ours < 1.0  # the problems mix right and wrong answers
    assert harness == pytest.approx(ours)


def test_lm_eval_bad_input_names_it(tasks_dir, tmp_path, monkeypatch):
    base = [
        "eval",
        "--model_name_or_path",
        MODEL,
        "--suite",
        "lm-eval",
        "--output_dir",
        str(tmp_path / "out"),
    ]
    line = error_line([*base, "--tasks", "mult_gne", "--include_path", str(tasks_dir)])
    assert "'mult_gne'" in line and "did you mean 'mult_gen'" in line
    line = error_line([*base, "--tasks", "mult_gen", "--include_path", str(tmp_path / "missing")])
    assert "include_path" in line and "missing" in line
    assert "suite" in error_line([*base[:3], "--suite", "lm_eval", "--tasks", "mult_gen"])
    monkeypatch.setitem(sys.modules, "lm_eval", None)  # the extra not installed
    line = error_line([*base, "--tasks", "mult_gen", "--include_path", str(tasks_dir)])
    assert "sapo[eval]" in line
    assert not (tmp_path / "out").exists()


def generate(tmp_path, suite, prompts, name):
    path = tmp_path / name
    path.write_text(prompts)
    output = tmp_path / f"answers-{name}"
    argv = ["generate", "--suite", suite, "--model_name_or_path", MODEL, "--prompts", str(path),
            "--output", str(output), "--max_new_tokens", "12"]  # fmt: skip
    status, _, err = run(argv)
    assert status == 0, err
    return output


def test_generate_alpaca_eval(tmp_path):
    prompts = [{"instruction": "12*11=", "dataset": "arithmetic"}, {"instruction": "23*45="},
               {"instruction": "Write a haiku."}]  # fmt: skip
    outputs = json.loads(generate(tmp_path, "alpaca-eval", json.dumps(prompts), "alpaca.json").read_text())
    assert [item["instruction"] for item in outputs] == [prompt["instruction"] for prompt in prompts]
    assert all(set(item) >= {"instruction", "output", "generator"} for item in outputs)
    assert outputs[0]["dataset"] == "arithmetic"  # other keys kept
    assert {item["generator"] for item in outputs} == {"builtin-tiny-multiplication-sft"}
    assert all(isinstance(item["output"], str) for item in outputs) and outputs[0]["output"]


def test_generate_mt_bench_answers_each_turn_after_the_last(tmp_path, monkeypatch):
    real, calls = sapo.evaluation.answers.answer_conversations, []

    def recording(model, tokenizer, conversations, temperatures, *args, **kwargs):
        answers = real(model, tokenizer, conversations, temperatures, *args, **kwargs)
        calls.append((conversations, list(temperatures), answers))
        return answers

    monkeypatch.setattr(sapo.evaluation.answers, "answer_conversations", recording)
    questions = [{"question_id": 81, "category": "writing", "turns": ["12*11=", "And 13*11="]},
                 {"question_id": 111, "category": "math", "turns": ["50*20=", "Now double it."]}]  # fmt: skip
    path = generate(tmp_path, "mt-bench", "".join(json.dumps(q) + "\n" for q in questions), "question.jsonl")
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["question_id"] for line in lines] == [81, 111]
    for line in lines:
        assert set(line) == {"question_id", "answer_id", "model_id", "choices", "tstamp"}
        assert line["choices"][0]["index"] == 0 and len(line["choices"][0]["turns"]) == 2
        assert isinstance(line["answer_id"], str) and len(line["answer_id"]) == 22
        assert line["model_id"] == "builtin-tiny-multiplication-sft" and isinstance(line["tstamp"], float)
    assert lines[0]["answer_id"] != lines[1]["answer_id"]
    (first, temperatures, first_answers), (second, _, _) = calls
    assert temperatures == [0.7, 0.0]  # FastChat's: writing 0.7, math 0
    assert second[0] == [
        {"role": "user", "content": "12*11="},
        {"role": "assistant", "content": first_answers[0]},
        {"role": "user", "content": "And 13*11="},
    ]
    assert [line["choices"][0]["turns"][0] for line in lines] == first_answers


def test_generate_bad_prompt_files_name_the_file_and_row(tmp_path):
    def line_for(suite, name, text):
        (tmp_path / name).write_text(text)
        argv = ["generate", "--suite", suite, "--model_name_or_path", MODEL,
                "--prompts", str(tmp_path / name), "--output", str(tmp_path / "out.json")]  # fmt: skip
        return error_line(argv)

    line = line_for("alpaca-eval", "a.json", json.dumps([{"instruction": "x"}, {"prompt": "y"}]))
    assert "a.json" in line and "row 1" in line and "instruction" in line
    line = line_for("mt-bench", "q.jsonl", '{"question_id": 1, "turns": ["hi"]}\nnot json\n')
    assert "q.jsonl" in line and "row 1 (line 2)" in line
    line = line_for("mt-bench", "r.jsonl", '{"question_id": 1, "turns": []}\n')
    assert "r.jsonl" in line and "row 0" in line and "turns" in line
    assert "suite" in line_for("judge", "s.json", "[]")
    assert not (tmp_path / "out.json").exists()


def rows_file(tmp_path, split, count):
    rows = task_dataset("multiplication", split).select(range(count))
    path = tmp_path / f"{split}.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def test_train_evaluates_and_logs_pairs(tmp_path, tasks_dir):
    output = tmp_path / "run"
    argv = ["train", "--model_name_or_path", MODEL, "--dataset_name", rows_file(tmp_path, "preference", 32),
            "--eval_dataset", rows_file(tmp_path, "validation", 8),
            "--eval_strategy", "steps", "--eval_steps", "2",
            "--eval_lm_tasks", "mult_gen", "--eval_lm_include_path", str(tasks_dir), "--eval_lm_steps", "4",
            "--eval_lm_limit", "4", "--log_pairs_steps", "2", "--max_steps", "4", "--segment_length", "3",
            "--max_length", "32", "--max_prompt_length", "24", "--per_device_train_batch_size", "8",
            "--logging_steps", "2", "--report_to", "none", "--save_strategy", "no", "--disable_tqdm", "true",
            "--output_dir", str(output)]  # fmt: skip
    status, out, err = run(argv)
    assert status == 0, err
    assert out.count("'eval_margin'") == 2 and "'eval_win_rate'" in out and "'eval_gold_logp'" in out
    assert "'eval_mult_gen/exact_match,none'" in out
    records = [json.loads(line) for line in (output / "pairs.jsonl").read_text().splitlines()]
    assert [record["step"] for record in records] == [2] * 4 + [4] * 4
    assert all("⟦" in record["rejected"] or record["identical"] for record in records)


def test_train_eval_dataset_needs_an_eval_strategy(tmp_path):
    argv = ["train", "--model_name_or_path", MODEL, "--dataset_name", rows_file(tmp_path, "preference", 8),
            "--eval_dataset", rows_file(tmp_path, "validation", 4), "--max_steps", "1",
            "--output_dir", str(tmp_path / "run")]  # fmt: skip
    assert "eval_strategy" in error_line(argv)
    argv = [*argv[:6], str(tmp_path / "nowhere.jsonl"), *argv[7:], "--eval_strategy", "steps"]
    line = error_line(argv)
    assert line.startswith("error: eval_dataset:") and "nowhere.jsonl" in line
    assert not (tmp_path / "run").exists()


def test_usage_lists_generate():
    status, out, _ = run(["--help"])
    assert status == 0 and "generate" in out and "lm-eval" in out


def test_a_lora_adapter_folder_loads_onto_its_base(tmp_path, tokenizer):
    tiny_llama(tokenizer).save_pretrained(tmp_path / "base")
    tokenizer.save_pretrained(tmp_path / "base")
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    adapter = get_peft_model(base, LoraConfig(r=2, target_modules="all-linear", task_type="CAUSAL_LM"))
    adapter.save_pretrained(tmp_path / "adapter")  # no tokenizer beside it
    model_args = ModelArguments(model_name_or_path=str(tmp_path / "adapter"))
    loaded_tokenizer = evaluation_tokenizer(model_args)
    model = evaluation_model(model_args, loaded_tokenizer)
    assert isinstance(model, PeftModel) and not model.training
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
