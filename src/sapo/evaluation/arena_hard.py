"""Arena-Hard-Auto's files (lmarena/arena-hard-auto): its question files, version 0.1 or 2.0, and
the answer lines its judge (``gen_judgment.py``) and style control (``show_result.py``) read.

- **v0.1**: a question is ``{"question_id", "category", "cluster", "turns": [{"content"}]}``; an
  answer line holds ``question_id``, ``answer_id``, ``model_id``,
  ``choices: [{"index": 0, "turns": [{"content", "token_len"}]}]``, ``tstamp`` and, for a one-turn
  question (all of v0.1's), ``conv_metadata``.
- **v2.0**: a question is ``{"uid", "category", "subcategory", "prompt"}``; an answer line holds
  ``uid``, ``ans_id``, ``model``, ``messages`` (the user's prompt, then ``{"role": "assistant",
  "content": {"answer": ...}}``), ``tstamp`` and ``metadata``.

``conv_metadata`` (v0.1) and ``metadata`` (v2.0) are what style control compares between two
answers: ``token_len`` and the markdown headers (``h1``..``h6``), list items (ordered, unordered)
and bold spans (``**``, ``__``) of the answer, counted as arena-hard-auto's ``add_markdown_info.py``
counts them, after taking out the contents of fenced code blocks. ``token_len`` is counted by the
caller (sapo counts the model's own tokens; arena-hard-auto counts tiktoken's). Answer files are
written in question-id order, as arena-hard-auto's ``reorg_answer_file`` leaves them.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

V01, V20 = "v0.1", "v2.0"
# arena-hard-auto's answer settings: v0.1's gen_answer_config.yaml (temperature 0, max_tokens
# 4096); v2.0 sets them per model in api_config.yaml, where its example of an open model on its
# own server (gemma-3-27b-it) has temperature 0 and max_tokens 8196
MAX_NEW_TOKENS = {V01: 4096, V20: 8196}
ID_KEYS = {V01: "question_id", V20: "uid"}

CODE_BLOCK_CONTENT = re.compile(r"```([^`]*)```")
HEADERS = {f"h{level}": re.compile(rf"^#{{{level}}}\s", re.MULTILINE) for level in range(1, 7)}
LIST_ITEMS = {
    "ordered": re.compile(r"^\s*\d+\.\s", re.MULTILINE),
    "unordered": re.compile(r"^\s*[-*+]\s", re.MULTILINE),
}
BOLD_SPANS = {"**": re.compile(r"\*\*[^*\n]+\*\*"), "__": re.compile(r"__[^_\n]+__")}


@dataclass(frozen=True)
class Question:
    """One question: its id (``question_id`` or ``uid``) and the user turns to answer in order."""

    id: str | int
    turns: tuple[str, ...]


def read_questions(located: Sequence[tuple[str, Any]], source: str) -> tuple[str, list[Question]]:
    """The version of a question file and its questions, from its records each with where it is
    (``line 3``); the first record sets the version. ``ValueError`` naming the file and the line
    of the first record that is not a question of that version."""
    version = None
    questions: list[Question] = []
    seen: dict[Any, str] = {}
    for where, record in located:
        prefix = f"prompts: {source}: {where}"
        found = _version_of(record)
        if found is None:
            raise ValueError(
                f"{prefix}: not an Arena-Hard question: v0.1 has 'question_id' and 'turns': "
                "[{'content': ...}], v2.0 has 'uid' and 'prompt'"
            )
        version = version or found
        if found != version:
            raise ValueError(
                f"{prefix}: a {found} question in a {version} file (its first question is {version})"
            )
        question = _question(record, version, prefix)
        if not isinstance(question.id, (str, int)) or isinstance(question.id, bool):
            raise ValueError(f"{prefix}: {ID_KEYS[version]} must be a string or an integer")
        if question.id in seen:
            raise ValueError(
                f"{prefix}: {ID_KEYS[version]} {question.id!r} repeats that of {seen[question.id]}"
            )
        seen[question.id] = where
        questions.append(question)
    return version, questions


def _version_of(record: Any) -> str | None:
    if not isinstance(record, dict):
        return None
    if "uid" in record and "prompt" in record:
        return V20
    if "question_id" in record and "turns" in record:
        return V01
    return None


def _question(record: dict, version: str, prefix: str) -> Question:
    if version == V20:
        prompt = record["prompt"]
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError(f"{prefix}: 'prompt' must be a non-empty string")
        return Question(record["uid"], (prompt,))
    turns = record["turns"]
    if not isinstance(turns, list) or not turns:
        raise ValueError(f"{prefix}: 'turns' must be a non-empty list of {{'content': ...}}")
    texts = []
    for index, turn in enumerate(turns):
        content = turn.get("content") if isinstance(turn, dict) else None
        if not isinstance(content, str) or not content.strip():
            hint = (
                " (a list of strings is MT-Bench's format: --suite mt-bench)" if isinstance(turn, str) else ""
            )
            raise ValueError(f"{prefix}: turns[{index}] must be {{'content': a non-empty string}}{hint}")
        texts.append(content)
    return Question(record["question_id"], tuple(texts))


def markdown_counts(answer: str) -> dict[str, dict[str, int]]:
    """The markdown elements style control counts in ``answer``, code blocks' contents left out
    (each block's content removed wherever it occurs, as arena-hard-auto removes it)."""
    for content in CODE_BLOCK_CONTENT.findall(answer):
        answer = answer.replace(content, "")
    return {
        "header_count": {name: len(pattern.findall(answer)) for name, pattern in HEADERS.items()},
        "list_count": {name: len(pattern.findall(answer)) for name, pattern in LIST_ITEMS.items()},
        "bold_count": {name: len(pattern.findall(answer)) for name, pattern in BOLD_SPANS.items()},
    }


def answer_line(
    version: str,
    question: Question,
    answers: Sequence[str],
    token_lens: Sequence[int],
    model: str,
    answer_id: str,
    tstamp: float,
) -> dict[str, Any]:
    """The answer-file line of ``question`` answered turn by turn with ``answers`` (of
    ``token_lens`` tokens each) by ``model``, in the format of ``version``."""
    if len(answers) != len(question.turns) or len(token_lens) != len(answers):
        raise ValueError(f"question {question.id!r}: {len(question.turns)} turns, {len(answers)} answers")
    if version == V20:
        (answer,), (token_len,) = answers, token_lens
        return {
            "uid": question.id,
            "ans_id": answer_id,
            "model": model,
            "messages": [
                {"role": "user", "content": question.turns[0]},
                {"role": "assistant", "content": {"answer": answer}},
            ],
            "tstamp": tstamp,
            "metadata": {"token_len": token_len, **markdown_counts(answer)},
        }
    line = {
        "question_id": question.id,
        "answer_id": answer_id,
        "model_id": model,
        "choices": [
            {"index": 0, "turns": [{"content": a, "token_len": n} for a, n in zip(answers, token_lens)]}
        ],
        "tstamp": tstamp,
    }
    if len(answers) == 1:  # arena-hard-auto writes it for one-turn answers only
        line["conv_metadata"] = {"token_len": token_lens[0], **markdown_counts(answers[0])}
    return line


def in_question_order(lines: Sequence[dict[str, Any]], version: str) -> list[dict[str, Any]]:
    """``lines`` sorted by question id (integers before strings, as ids of one kind sort)."""
    key = ID_KEYS[version]
    return sorted(lines, key=lambda line: (isinstance(line[key], str), line[key]))
