"""`sapo generate --suite arena-hard`, end to end and offline: Arena-Hard-Auto question files of
v0.1 and v2.0 answered by a built-in model into the answer file of the version read; bad question
files exit 2 with one line naming the file and the line. No judge runs here."""

import json

import pytest
from sapo_command import run_sapo, sapo_error_line

import sapo.evaluation.answers
from sapo.cli.arguments import ModelArguments
from sapo.cli.loading import load_tokenizer

V01_QUESTIONS = [  # two questions as v0.1's question.jsonl holds them, ids out of order
    {"question_id": qid, "category": "arena-hard-v0.1", "cluster": "Math", "turns": [{"content": text}]}
    for qid, text in (("c0ffee", "12*11="), ("0abc12", "23*45="))
]
V20_QUESTIONS = [
    {"uid": "2edbb5f36f5b42be", "category": "hard_prompt", "subcategory": "coding", "prompt": "31*17="},
    {"uid": "0a1b2c3d4e5f6a7b", "category": "creative_writing", "subcategory": "poem", "prompt": "A haiku."},
]
MODEL = "builtin:tiny-multiplication-sft"
MARKDOWN_KEYS = {"token_len", "header_count", "list_count", "bold_count"}


@pytest.fixture
def recorded(monkeypatch):
    """Every call of ``answer_conversations``: its conversations, temperatures, limit and answers."""
    real, calls = sapo.evaluation.answers.answer_conversations, []

    def recording(model, tokenizer, conversations, temperatures, max_new_tokens, **kwargs):
        answers = real(model, tokenizer, conversations, temperatures, max_new_tokens, **kwargs)
        calls.append((conversations, list(temperatures), max_new_tokens, answers))
        return answers

    monkeypatch.setattr(sapo.evaluation.answers, "answer_conversations", recording)
    return calls


def generate(tmp_path, questions, model=MODEL, *flags):
    path = tmp_path / "question.jsonl"
    path.write_text("".join(json.dumps(question) + "\n" for question in questions))
    output = tmp_path / "model_answer.jsonl"
    argv = ["generate", "--suite", "arena-hard", "--model_name_or_path", model, "--prompts", str(path),
            "--output", str(output), *flags]  # fmt: skip
    status, out, err = run_sapo(argv)
    assert status == 0, err
    return [json.loads(line) for line in output.read_text().splitlines()], out


def token_len(text):
    tokenizer = load_tokenizer(ModelArguments(model_name_or_path=MODEL))
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def test_v01_questions_give_v01_answer_lines(tmp_path, recorded):
    lines, out = generate(tmp_path, V01_QUESTIONS)
    assert "(v0.1)" in out
    assert [line["question_id"] for line in lines] == ["0abc12", "c0ffee"]  # question-id order
    for line in lines:
        assert set(line) == {"question_id", "answer_id", "model_id", "choices", "tstamp", "conv_metadata"}
        assert line["model_id"] == "builtin-tiny-multiplication-sft" and isinstance(line["tstamp"], float)
        assert isinstance(line["answer_id"], str) and len(line["answer_id"]) == 22
        (choice,) = line["choices"]
        assert choice["index"] == 0 and len(choice["turns"]) == 1
        turn = choice["turns"][0]
        assert turn["token_len"] == token_len(turn["content"]) == line["conv_metadata"]["token_len"]
        assert set(line["conv_metadata"]) == MARKDOWN_KEYS
        assert set(line["conv_metadata"]["header_count"]) == {"h1", "h2", "h3", "h4", "h5", "h6"}
    assert lines[0]["answer_id"] != lines[1]["answer_id"]
    # greedy, up to 4096 new tokens (v0.1's gen_answer_config.yaml), each asked its turn's content
    ((conversations, temperatures, max_new_tokens, answers),) = recorded
    assert temperatures == [0.0, 0.0] and max_new_tokens == 4096
    assert conversations == [[{"role": "user", "content": q["turns"][0]["content"]}] for q in V01_QUESTIONS]
    by_id = {line["question_id"]: line["choices"][0]["turns"][0]["content"] for line in lines}
    assert [by_id[q["question_id"]] for q in V01_QUESTIONS] == answers
    assert answers == ["132", "1035"]  # the warm start multiplies these right


def test_v20_questions_give_v20_answer_lines(tmp_path, recorded):
    lines, out = generate(tmp_path, V20_QUESTIONS, MODEL, "--generator", "tiny-sapo")
    assert "(v2.0)" in out
    assert [line["uid"] for line in lines] == sorted(q["uid"] for q in V20_QUESTIONS)
    prompts = {q["uid"]: q["prompt"] for q in V20_QUESTIONS}
    for line in lines:
        assert set(line) == {"uid", "ans_id", "model", "messages", "tstamp", "metadata"}
        assert line["model"] == "tiny-sapo" and len(line["ans_id"]) == 22
        user, assistant = line["messages"]
        assert user == {"role": "user", "content": prompts[line["uid"]]}
        assert assistant["role"] == "assistant" and set(assistant["content"]) == {"answer"}
        assert line["metadata"]["token_len"] == token_len(assistant["content"]["answer"])
        assert set(line["metadata"]) == MARKDOWN_KEYS
    ((_, temperatures, max_new_tokens, _),) = recorded
    assert temperatures == [0.0, 0.0] and max_new_tokens == 8196


def test_flags_override_arena_hards_settings(tmp_path, recorded):
    generate(tmp_path, V01_QUESTIONS[:1], MODEL, "--max_new_tokens", "7", "--temperature", "0.5")
    ((_, temperatures, max_new_tokens, _),) = recorded
    assert temperatures == [0.5] and max_new_tokens == 7


def test_bad_question_files_name_the_file_and_line(tmp_path):
    def error_for(text):
        path = tmp_path / "question.jsonl"
        path.write_text(text)
        output = tmp_path / "answers.jsonl"
        argv = ["generate", "--suite", "arena-hard", "--model_name_or_path", MODEL, "--prompts", str(path),
                "--output", str(output)]  # fmt: skip
        line = sapo_error_line(argv)
        assert not output.exists() and "question.jsonl" in line
        return line

    v01, v20 = json.dumps(V01_QUESTIONS[0]), json.dumps(V20_QUESTIONS[0])
    assert "line 3" in error_for(f"{v01}\n\n{{not json\n")
    line = error_for(f'{v01}\n{{"id": 3, "text": "12*3="}}\n')
    assert "line 2" in line and "not an Arena-Hard question" in line
    line = error_for(f"{v01}\n{v20}\n")
    assert "line 2" in line and "v2.0 question in a v0.1 file" in line
    line = error_for('{"question_id": "q", "turns": ["12*3="]}\n')
    assert "line 1" in line and "turns[0]" in line and "--suite mt-bench" in line
    line = error_for(f"{v20}\n{v20}\n")
    assert "line 2" in line and "repeats that of line 1" in line
    line = error_for('{"uid": "u", "prompt": "  "}\n')
    assert "line 1" in line and "'prompt'" in line
