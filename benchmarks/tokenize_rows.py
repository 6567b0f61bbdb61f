"""Rows per second of ``sapo.data.prepare_dataset``, batched, against the per-row path it replaced.

The per-row path (``per_row_prepare`` below, the implementation ``prepare_dataset`` had before it
tokenized in batches, kept here as the reference) maps one row at a time: two chat-template
calls and two tokenizer calls per row, then a filter and a map over the rows for the length
limits. ``prepare_dataset`` now maps batches of rows: one chat-template call for the batch's
prompts and one for its conversations, one encoding call (fast tokenizers encode a batch on
every core), and the length limits in the same pass.

Data: ``--rows`` synthetic rows in each format, made locally: ``messages`` conversations of 2-4
user/assistant exchanges (a system turn in half of them), ``prompt``/``completion`` strings, and
conversational ``prompt``/``completion`` lists; 10-80 words per turn (``--words``). Tokenizer: a
byte-level BPE with a vocabulary of up to 8,000 tokens trained on those texts (``--tokenizer
char``: the one-token-per-character tokenizer of ``sapo.builtin.tiny``), with
``sapo.builtin.tiny``'s chat template. Both paths get the same rows and tokenizer, their outputs
are compared id for id, and the two are timed in turn over ``--rounds`` rounds (medians). Each
path's CPU seconds are measured too (the process's, all threads): the batched path's, spread
evenly over the cores, bound the speed-up these cores allow (``speedup_bound``; not reported
with ``--num_proc``, whose workers' CPU time the parent does not see). The last line printed is
one JSON object.

    python -m benchmarks.tokenize_rows                # 4000 rows per format, 3 rounds: 5 min on busy cores
    python -m benchmarks.tokenize_rows --quick        # 200 rows, 1 round: checks that it runs
    python -m benchmarks.tokenize_rows --num_proc 2   # prepare_dataset in 2 processes
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import time
from typing import Any

if not __package__:  # started as a file: run as the module (benchmarks/__init__.py)
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.tokenize_rows", *sys.argv[1:]])

import datasets
import transformers
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from benchmarks import harness
from sapo.builtin.tiny import BOS, CHAT_TEMPLATE, EOS, PAD, ROLE_TOKENS, char_tokenizer
from sapo.data import GOLD_IDS, PROMPT_IDS, prepare_dataset, split_row

FORMATS = ("messages", "prompt_completion", "conversational")
CORES = harness.cores_available()


# ---------------------------------------------------------------------------------------------
# the reference: the per-row path prepare_dataset had before
# ---------------------------------------------------------------------------------------------


def per_row_ids(prompt: Any, answer: Any, tokenizer) -> tuple[list[int], list[int]]:
    """One row's prompt and gold ids, as the per-row path computed them."""
    if isinstance(prompt, str):
        prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
        gold_ids = tokenizer(answer, add_special_tokens=False)["input_ids"]
    else:
        prompt_text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(prompt + [answer], tokenize=False)
        if not full_text.startswith(prompt_text):
            raise ValueError("the chat template does not render the prompt as a prefix of the conversation")
        prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        gold_ids = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos in gold_ids:
        last = len(gold_ids) - 1 - gold_ids[::-1].index(eos)
        if not tokenizer.decode(gold_ids[last + 1 :]).strip():
            return prompt_ids, gold_ids[: last + 1]
    return prompt_ids, gold_ids + [eos]


def per_row_prepare(dataset: Dataset, tokenizer, max_length: int | None, max_prompt_length: int | None):
    """The per-row path: one row per call of the map, then a filter and a map for the limits."""

    def tokenize(row: dict[str, Any], index: int) -> dict[str, list[int]]:
        prompt_ids, gold_ids = per_row_ids(*split_row(row, index), tokenizer)
        return {PROMPT_IDS: prompt_ids, GOLD_IDS: gold_ids}

    tokenized = dataset.map(tokenize, with_indices=True, remove_columns=dataset.column_names)
    prompt_limit = max_prompt_length
    if max_length is not None:
        prompt_limit = min(prompt_limit or max_length - 1, max_length - 1)
    if prompt_limit is not None:
        tokenized = tokenized.filter(lambda row: len(row[PROMPT_IDS]) <= prompt_limit)
    if max_length is not None:
        tokenized = tokenized.map(lambda row: {GOLD_IDS: row[GOLD_IDS][: max_length - len(row[PROMPT_IDS])]})
    return tokenized


# ---------------------------------------------------------------------------------------------
# data and tokenizer
# ---------------------------------------------------------------------------------------------


def make_words(rng: random.Random, count: int = 3000) -> list[str]:
    syllables = [c + v for c in "bcdfghklmnprstvz" for v in "aeiou"]
    return ["".join(rng.choice(syllables) for _ in range(rng.randint(1, 4))) for _ in range(count)]


def make_rows(count: int, words_per_turn: tuple[int, int] = (10, 80), seed: int = 0) -> dict[str, list[dict]]:
    """``count`` rows in each of the three formats, from the same conversations."""
    rng = random.Random(seed)
    words = make_words(rng)

    def text() -> str:
        return " ".join(rng.choice(words) for _ in range(rng.randint(*words_per_turn))).capitalize() + "."

    rows = {name: [] for name in FORMATS}
    for _ in range(count):
        messages = [{"role": "system", "content": text()}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(2, 4)):
            messages += [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]
        rows["messages"].append({"messages": messages})
        rows["prompt_completion"].append(
            {"prompt": messages[-2]["content"], "completion": messages[-1]["content"]}
        )
        rows["conversational"].append({"prompt": messages[:-1], "completion": messages[-1:]})
    return rows


def bpe_tokenizer(rows: dict[str, list[dict]], vocab_size: int = 8000) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on the rows' texts, with the tiny tokenizer's specials and template."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, EOS, *ROLE_TOKENS]
    texts = (message["content"] for row in rows["messages"] for message in row["messages"])
    backend.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token=PAD, bos_token=BOS, eos_token=EOS)
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


# ---------------------------------------------------------------------------------------------
# measurement
# ---------------------------------------------------------------------------------------------


def timed(prepare, dataset: Dataset, outputs: dict, name: str) -> tuple[float, float]:
    """Wall and CPU seconds ``prepare(dataset)`` took; its result goes into ``outputs[name]``.

    The CPU seconds are the process's, summed over its threads (the backend's encoding threads
    too): divided by the cores, they bound how fast that work can go on this machine. The heap is
    collected first, so that neither path pays for the garbage the other left.
    """
    gc.collect()
    started, cpu_started = time.perf_counter(), time.process_time()
    outputs[name] = prepare(dataset)
    return time.perf_counter() - started, time.process_time() - cpu_started


def measure(dataset: Dataset, paths: dict, rounds: int, num_proc: int | None) -> dict:
    """Both paths on ``dataset`` in turn over ``rounds`` rounds: medians, CPU seconds, the same ids."""
    seconds = {path: [] for path in paths}
    cpu_seconds = {path: [] for path in paths}
    identical = True
    for _ in range(rounds):
        outputs = {}
        for path, prepare in paths.items():
            wall, cpu = timed(prepare, dataset, outputs, path)
            seconds[path].append(wall)
            cpu_seconds[path].append(cpu)
        for column in (PROMPT_IDS, GOLD_IDS):
            identical &= outputs["per_row"][column] == outputs["batched"][column]
    kept = len(outputs["batched"])
    wall = {path: statistics.median(values) for path, values in seconds.items()}
    cpu = {path: statistics.median(values) for path, values in cpu_seconds.items()}
    rates = {path: len(dataset) / wall[path] for path in paths}
    return {
        "rows": len(dataset),
        "rows_kept": kept,
        "per_row_rows_per_s": round(rates["per_row"], 1),
        "batched_rows_per_s": round(rates["batched"], 1),
        "speedup": round(rates["batched"] / rates["per_row"], 2),
        "per_row_cpu_s": round(cpu["per_row"], 3),
        "batched_cpu_s": round(cpu["batched"], 3),
        # the speed-up if the batched path's CPU work were spread evenly over every core
        "speedup_bound": None if num_proc else round(wall["per_row"] / (cpu["batched"] / CORES), 2),
        "ids_identical": bool(identical),
        "mean_tokens_per_row": round(
            sum(len(p) + len(g) for p, g in zip(outputs["batched"][PROMPT_IDS], outputs["batched"][GOLD_IDS]))
            / max(1, kept),
            1,
        ),
    }


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="200 rows per format, one round")
    parser.add_argument("--rows", type=int, default=4000, help="rows per format")
    parser.add_argument("--rounds", type=int, default=3, help="timed runs of each path, alternating")
    parser.add_argument("--tokenizer", choices=("bpe", "char"), default="bpe")
    parser.add_argument(
        "--words", type=int, nargs=2, default=(10, 80), metavar=("MIN", "MAX"), help="words per turn"
    )
    parser.add_argument("--num_proc", type=int, help="processes for prepare_dataset (default: one)")
    parser.add_argument("--max_length", type=int, default=2048)
    parser.add_argument("--max_prompt_length", type=int, default=1792)
    settings = parser.parse_args(argv)
    if settings.quick:
        settings.rows, settings.rounds = 200, 1
    return settings


def main(argv=None) -> dict:
    settings = parse_args(argv)
    datasets.disable_progress_bars()
    datasets.disable_caching()  # every run tokenizes: nothing is read back from a cache
    transformers.logging.set_verbosity_error()
    load_before = harness.load_average()
    rows = make_rows(settings.rows, tuple(settings.words))
    tokenizer = bpe_tokenizer(rows) if settings.tokenizer == "bpe" else char_tokenizer()
    limits = dict(max_length=settings.max_length, max_prompt_length=settings.max_prompt_length)

    def batched(dataset):
        return prepare_dataset(dataset, tokenizer, **limits, num_proc=settings.num_proc)

    def per_row(dataset):
        return per_row_prepare(dataset, tokenizer, **limits)

    paths = {"per_row": per_row, "batched": batched}
    # the rows as Python objects are the benchmark's, not the code's: the collector leaves them be
    # (where its full passes over them landed moved the batched rate by a quarter between runs)
    gc.collect()
    gc.freeze()
    try:
        results = {
            name: measure(Dataset.from_list(rows[name]), paths, settings.rounds, settings.num_proc)
            for name in FORMATS
        }
    finally:
        gc.unfreeze()

    print(
        f"prepare_dataset: {settings.rows} rows per format, {settings.tokenizer} tokenizer "
        f"({len(tokenizer)} tokens), {settings.rounds} round(s), num_proc {settings.num_proc}; "
        f"{CORES} cores"
    )
    header = ("format", "per-row rows/s", "batched rows/s", "speedup", "bound", "same ids", "tokens/row")
    print(f"{header[0]:<20}" + "".join(f"{cell:>16}" for cell in header[1:]))
    for name, result in results.items():
        cells = (
            f"{result['per_row_rows_per_s']:.0f}",
            f"{result['batched_rows_per_s']:.0f}",
            f"{result['speedup']:.2f}x",
            "-" if result["speedup_bound"] is None else f"{result['speedup_bound']:.2f}x",
            "yes" if result["ids_identical"] else "NO",
            f"{result['mean_tokens_per_row']:.0f}",
        )
        print(f"{name:<20}" + "".join(f"{cell:>16}" for cell in cells))
    measured_on = harness.machine(load_before)
    print(harness.describe(measured_on))
    summary = {
        "benchmark": "tokenize_rows",
        "speedup": {name: result["speedup"] for name, result in results.items()},
        "ids_identical": all(result["ids_identical"] for result in results.values()),
        "formats": results,
        "settings": {**vars(settings), "tokenizer_size": len(tokenizer)},
        "machine": measured_on,
    }
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
