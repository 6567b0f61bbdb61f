"""Turn SFT rows into token ids: a prompt and its one gold answer.

Accepted formats (TRL's names):
- ``messages``: a conversation; the last message is the assistant's gold answer and the earlier
  turns are the prompt, rendered with the tokenizer's chat template;
- ``prompt`` + ``completion``: plain strings, or conversational lists of messages.

Every gold answer ends with the EOS token (one is appended when the text lacks it), because the
segment rule needs to know where an answer stops.
"""

from __future__ import annotations

import logging
from typing import Any

from datasets import Dataset

logger = logging.getLogger(__name__)

PROMPT_IDS, GOLD_IDS = "prompt_ids", "gold_ids"


def _check_messages(messages: Any, index: int, column: str) -> None:
    if not isinstance(messages, list) or not messages:
        raise ValueError(f"row {index}: column {column!r} must be a non-empty list of messages")
    for message in messages:
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise ValueError(f"row {index}: column {column!r}: every message needs 'role' and 'content'")
        if not isinstance(message["content"], str):
            raise ValueError(
                f"row {index}: column {column!r}: message content must be a string, "
                f"got {type(message['content']).__name__}"
            )


def split_row(row: dict[str, Any], index: int) -> tuple[Any, Any]:
    """Validate one row and return ``(prompt, answer)``.

    For conversational rows ``prompt`` is a list of messages and ``answer`` the final assistant
    message; for plain rows both are strings. Raises ``ValueError`` naming the row and column.
    """
    if "messages" in row:
        messages = row["messages"]
        _check_messages(messages, index, "messages")
        if messages[-1]["role"] != "assistant":
            raise ValueError(
                f"row {index}: column 'messages': the last message must be from the assistant, "
                f"got role {messages[-1]['role']!r}"
            )
        prompt, answer = messages[:-1], messages[-1]
        text, column = answer["content"], "messages"
    elif "prompt" in row and "completion" in row:
        prompt, answer = row["prompt"], row["completion"]
        if isinstance(prompt, str) != isinstance(answer, str):
            raise ValueError(
                f"row {index}: columns 'prompt' and 'completion' must both be strings or both be lists"
            )
        column = "completion"
        if isinstance(answer, str):
            text = answer
        else:
            _check_messages(prompt, index, "prompt")
            _check_messages(answer, index, "completion")
            if len(answer) != 1 or answer[0]["role"] != "assistant":
                raise ValueError(f"row {index}: column 'completion' must hold exactly one assistant message")
            answer = answer[0]
            text = answer["content"]
    else:
        raise ValueError(
            f"row {index}: missing column: need 'messages', or 'prompt' and 'completion'; found {sorted(row)}"
        )
    if not text.strip():
        raise ValueError(f"row {index}: column {column!r}: the gold answer is empty")
    return prompt, answer


def tokenize_row(prompt: Any, answer: Any, tokenizer) -> tuple[list[int], list[int]]:
    """Token ids of the prompt and of the gold answer (ending in EOS)."""
    eos = tokenizer.eos_token_id
    if isinstance(prompt, str):
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        gold_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    else:
        if tokenizer.chat_template is None:
            raise ValueError(
                "conversational data needs a tokenizer with a chat template (set `chat_template`)"
            )
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(prompt + [answer], tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        gold_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    return prompt_ids, _end_with_eos(gold_ids, eos, tokenizer)


def _end_with_eos(gold_ids: list[int], eos: int, tokenizer) -> list[int]:
    """Make the answer end with EOS: chat templates may put whitespace after their end-of-turn
    token (which is then dropped); answers without a final EOS get one appended."""
    if eos in gold_ids:
        last = len(gold_ids) - 1 - gold_ids[::-1].index(eos)
        if not tokenizer.decode(gold_ids[last + 1 :]).strip():
            return gold_ids[: last + 1]
    return gold_ids + [eos]


def prepare_dataset(
    dataset: Dataset,
    tokenizer,
    max_length: int | None,
    max_prompt_length: int | None,
    num_proc: int | None = None,
) -> Dataset:
    """Validate and tokenize ``dataset`` into ``prompt_ids``/``gold_ids`` columns.

    Rows whose prompt is longer than ``max_prompt_length`` are dropped, with one warning that
    counts them; gold answers are cut to fit ``max_length`` (their start is kept).
    """
    if len(dataset) == 0:
        raise ValueError("the training dataset is empty")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; SAPO needs one to end answers")
    for required in (("messages",), ("prompt", "completion")):
        if all(column in dataset.column_names for column in required):
            break
    else:
        raise ValueError(
            f"missing column: the dataset needs 'messages', or 'prompt' and 'completion'; "
            f"found {dataset.column_names}"
        )

    def tokenize(row: dict[str, Any], index: int) -> dict[str, list[int]]:
        prompt, answer = split_row(row, index)
        prompt_ids, gold_ids = tokenize_row(prompt, answer, tokenizer)
        return {PROMPT_IDS: prompt_ids, GOLD_IDS: gold_ids}

    tokenized = dataset.map(
        tokenize, with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc, desc="Tokenizing"
    )
    prompt_limit = max_prompt_length
    if max_length is not None:
        prompt_limit = min(prompt_limit or max_length - 1, max_length - 1)
    if prompt_limit is not None:
        kept = tokenized.filter(lambda row: len(row[PROMPT_IDS]) <= prompt_limit, num_proc=num_proc)
        dropped = len(tokenized) - len(kept)
        if dropped:
            logger.warning(
                "dropped %d of %d rows whose prompt is longer than %d tokens",
                dropped,
                len(tokenized),
                prompt_limit,
            )
        if len(kept) == 0:
            raise ValueError(
                f"every row's prompt is longer than {prompt_limit} tokens; nothing left to train on"
            )
        tokenized = kept
    if max_length is not None:
        tokenized = tokenized.map(
            lambda row: {GOLD_IDS: row[GOLD_IDS][: max_length - len(row[PROMPT_IDS])]}, num_proc=num_proc
        )
    return tokenized


def collate_rows(rows: list[dict[str, Any]]) -> dict[str, list[list[int]]]:
    """Keep dataset rows as id lists: they are generation prompts, not model inputs."""
    return {PROMPT_IDS: [row[PROMPT_IDS] for row in rows], GOLD_IDS: [row[GOLD_IDS] for row in rows]}
