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
from collections.abc import Sequence
from typing import Any

from datasets import Dataset, Features, List, Value
from transformers.tokenization_utils_base import PreTrainedTokenizerBase
from transformers.tokenization_utils_tokenizers import TokenizersBackend

logger = logging.getLogger(__name__)

PROMPT_IDS, GOLD_IDS = "prompt_ids", "gold_ids"
# the columns' types, given to ``map`` so that it need not infer them from every batch
TOKENIZED_FEATURES = Features({PROMPT_IDS: List(Value("int64")), GOLD_IDS: List(Value("int64"))})


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


def tokenize_rows(
    prompts: Sequence[Any], answers: Sequence[Any], tokenizer, indices: Sequence[int] | None = None
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids of each prompt and of its gold answer (ending in EOS), for rows from :func:`split_row`.

    Plain rows are encoded in one call per column; conversational rows go through the chat
    template in one call for the prompts and one for the whole conversations, then one encoding
    call for both texts (:func:`encode_texts`): the same ids as row by row, with each call's
    overhead paid once per batch (and a fast tokenizer encodes a batch on all cores).
    ``indices`` name the rows in errors (default: their positions).
    """
    indices = range(len(prompts)) if indices is None else indices
    plain = [i for i, prompt in enumerate(prompts) if isinstance(prompt, str)]
    chat = [i for i, prompt in enumerate(prompts) if not isinstance(prompt, str)]
    # (rows, prompt texts, answer texts, whether the prompt gets the tokenizer's special tokens)
    groups = [(plain, [prompts[i] for i in plain], [answers[i] for i in plain], True)] if plain else []
    if chat:
        if tokenizer.chat_template is None:
            raise ValueError(
                "conversational data needs a tokenizer with a chat template (set `chat_template`)"
            )
        prompt_texts = tokenizer.apply_chat_template(
            [prompts[i] for i in chat], tokenize=False, add_generation_prompt=True
        )
        full_texts = tokenizer.apply_chat_template([prompts[i] + [answers[i]] for i in chat], tokenize=False)
        for i, prompt_text, full_text in zip(chat, prompt_texts, full_texts):
            if not full_text.startswith(prompt_text):
                raise ValueError(
                    f"row {indices[i]}: the chat template does not render the prompt as a prefix of the "
                    "conversation"
                )
        answer_texts = [full[len(prompt) :] for prompt, full in zip(prompt_texts, full_texts)]
        groups.append((chat, prompt_texts, answer_texts, False))
    prompt_ids: list[list[int]] = [[] for _ in prompts]
    gold_ids: list[list[int]] = [[] for _ in prompts]
    for rows, prompt_texts, answer_texts, specials in groups:
        if specials:
            prompt_rows = encode_texts(tokenizer, prompt_texts, True)
            gold_rows = encode_texts(tokenizer, answer_texts, False)
        else:  # one call for both columns: one pass over the batch on every core
            both = encode_texts(tokenizer, [*prompt_texts, *answer_texts], False)
            prompt_rows, gold_rows = both[: len(rows)], both[len(rows) :]
        for i, prompt_row, gold_row in zip(rows, prompt_rows, gold_rows):
            prompt_ids[i], gold_ids[i] = prompt_row, gold_row
    eos = tokenizer.eos_token_id
    return prompt_ids, [_end_with_eos(ids, eos, tokenizer) for ids in gold_ids]


def encode_texts(tokenizer, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    """The ids ``tokenizer(texts, add_special_tokens=...)["input_ids"]`` returns, faster where it is safe.

    A fast tokenizer's ``__call__`` builds a full ``Encoding`` (offsets, masks, word ids) per text
    and converts each into Python lists: on long chat turns that costs as much as the encoding
    itself. When the call would only reach the Rust backend's ``encode_batch`` unchanged (a
    ``TokenizersBackend`` whose encoding path is not overridden, with no truncation or padding
    left set on the backend and its special-token splitting as the tokenizer's), the backend's
    ``encode_batch_fast`` is asked for the ids alone; otherwise (slow tokenizers, subclasses,
    settings the call would reset) the tokenizer is called as usual.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if (
        isinstance(tokenizer, TokenizersBackend)
        and type(tokenizer)._encode_plus is TokenizersBackend._encode_plus
        and type(tokenizer).__call__ is PreTrainedTokenizerBase.__call__
        and hasattr(backend, "encode_batch_fast")
        and backend.truncation is None
        and backend.padding is None
        and backend.encode_special_tokens == tokenizer.split_special_tokens
    ):
        encodings = backend.encode_batch_fast(texts, add_special_tokens=add_special_tokens)
        return [encoding.ids for encoding in encodings]
    return tokenizer(texts, add_special_tokens=add_special_tokens)["input_ids"]


def _end_with_eos(gold_ids: list[int], eos: int, tokenizer) -> list[int]:
    """Make the answer end with EOS: chat templates may put whitespace after their end-of-turn
    token (which is then dropped); answers without a final EOS get one appended."""
    if eos in gold_ids:
        last = len(gold_ids) - 1 - gold_ids[::-1].index(eos)
        if last == len(gold_ids) - 1 or not tokenizer.decode(gold_ids[last + 1 :]).strip():
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
    counts them; gold answers are cut to fit ``max_length`` (their start is kept). Rows are
    tokenized in batches (:func:`tokenize_rows`), in ``num_proc`` processes when given.
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
    prompt_limit = max_prompt_length
    if max_length is not None:
        prompt_limit = min(prompt_limit or max_length - 1, max_length - 1)

    def tokenize(batch: dict[str, list], indices: list[int]) -> dict[str, list[list[int]]]:
        rows = ({column: values[i] for column, values in batch.items()} for i in range(len(indices)))
        prompts, answers = zip(*(split_row(row, index) for row, index in zip(rows, indices)))
        prompt_ids, gold_ids = tokenize_rows(prompts, answers, tokenizer, indices)
        kept = [i for i, ids in enumerate(prompt_ids) if prompt_limit is None or len(ids) <= prompt_limit]
        if max_length is not None:
            gold_ids = [ids[: max_length - len(prompt)] for prompt, ids in zip(prompt_ids, gold_ids)]
        return {PROMPT_IDS: [prompt_ids[i] for i in kept], GOLD_IDS: [gold_ids[i] for i in kept]}

    tokenized = dataset.map(
        tokenize, batched=True, with_indices=True, remove_columns=dataset.column_names, num_proc=num_proc,
        features=TOKENIZED_FEATURES, desc="Tokenizing",
    )  # fmt: skip
    dropped = len(dataset) - len(tokenized)
    if dropped:
        logger.warning(
            "dropped %d of %d rows whose prompt is longer than %d tokens", dropped, len(dataset), prompt_limit
        )
    if len(tokenized) == 0:
        raise ValueError(f"every row's prompt is longer than {prompt_limit} tokens; nothing left to train on")
    return tokenized


def collate_rows(rows: list[dict[str, Any]]) -> dict[str, list[list[int]]]:
    """Keep dataset rows as id lists: they are generation prompts, not model inputs."""
    return {PROMPT_IDS: [row[PROMPT_IDS] for row in rows], GOLD_IDS: [row[GOLD_IDS] for row in rows]}
