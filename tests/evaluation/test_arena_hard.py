"""Arena-Hard-Auto's files: question versions, answer lines and the markdown counts its style
control reads (sapo.evaluation.arena_hard)."""

import pytest

from sapo.evaluation.arena_hard import (
    V01,
    V20,
    Question,
    answer_line,
    in_question_order,
    markdown_counts,
    read_questions,
)

ANSWER = """# Plan
## Steps
1. Parse the input
2. **Sort** it, __twice__
- one
  * nested
+ plus
#no space, not a header
**not bold
```python
# a comment, not a header
- not a list item
**not bold either**
```
### Done"""


def test_markdown_counts_leave_code_blocks_out():
    assert markdown_counts(ANSWER) == {
        "header_count": {"h1": 1, "h2": 1, "h3": 1, "h4": 0, "h5": 0, "h6": 0},
        "list_count": {"ordered": 2, "unordered": 3},
        "bold_count": {"**": 1, "__": 1},
    }


def test_markdown_counts_remove_a_code_blocks_content_wherever_it_occurs():
    # arena-hard-auto deletes each block's content from the whole answer, so the list that repeats
    # it loses its first item and the second joins the fences' line: no list item is left (taking
    # the content out of the block alone would leave two); its baselines' counts are made so
    text = "```\n- item\n```\n- item\n- other\n"
    assert markdown_counts(text)["list_count"] == {"ordered": 0, "unordered": 0}


def test_read_questions_finds_the_version():
    v01 = [("line 1", {"question_id": "a", "category": "arena-hard-v0.1", "turns": [{"content": "hi"}]})]
    v20 = [("line 1", {"uid": 7, "category": "hard_prompt", "prompt": "hello"})]
    assert read_questions(v01, "q.jsonl") == (V01, [Question("a", ("hi",))])
    assert read_questions(v20, "q.jsonl") == (V20, [Question(7, ("hello",))])
    with pytest.raises(ValueError, match=r"q.jsonl: line 1: uid must be a string or an integer"):
        read_questions([("line 1", {"uid": [1], "prompt": "hello"})], "q.jsonl")


def test_a_multi_turn_v01_answer_has_every_turn_and_no_conversation_metadata():
    question = Question("q1", ("12*3=", "And doubled?"))
    line = answer_line(V01, question, ["36", "72"], [2, 2], "m", "id", 1.0)
    assert line["choices"] == [{"index": 0, "turns": [{"content": "36", "token_len": 2},
                                                      {"content": "72", "token_len": 2}]}]  # fmt: skip
    assert "conv_metadata" not in line  # arena-hard-auto writes it for one-turn answers only
    with pytest.raises(ValueError, match="2 turns, 1 answers"):
        answer_line(V01, question, ["36"], [2], "m", "id", 1.0)


def test_answer_lines_sort_by_question_id():
    lines = [{"uid": "b"}, {"uid": "a"}, {"uid": "c"}]
    assert [line["uid"] for line in in_question_order(lines, V20)] == ["a", "b", "c"]
    lines = [{"question_id": 10}, {"question_id": 9}]
    assert [line["question_id"] for line in in_question_order(lines, V01)] == [9, 10]
