"""benchmarks/tokenize_rows.py: batched ``prepare_dataset`` gives the per-row path's ids, and the
benchmark runs."""

from __future__ import annotations

import gc

import datasets
import pytest
from datasets import Dataset

from benchmarks import tokenize_rows
from sapo.builtin.tiny import char_tokenizer
from sapo.data import GOLD_IDS, PROMPT_IDS, prepare_dataset

datasets.disable_progress_bars()
ROWS = tokenize_rows.make_rows(60, words_per_turn=(1, 12), seed=3)


TOKENIZERS = {"char": char_tokenizer(), "bpe": tokenize_rows.bpe_tokenizer(ROWS, vocab_size=500)}


@pytest.mark.parametrize("name", tokenize_rows.FORMATS)
@pytest.mark.parametrize("tokenizer", sorted(TOKENIZERS))
@pytest.mark.parametrize("limits", [(None, None), (180, 150)], ids=["no-limits", "drops-and-cuts"])
def test_batched_ids_equal_the_per_row_ids(name, tokenizer, limits):
    tokenizer = TOKENIZERS[tokenizer]
    dataset = Dataset.from_list(ROWS[name])
    expected = tokenize_rows.per_row_prepare(dataset, tokenizer, *limits)
    got = prepare_dataset(dataset, tokenizer, *limits)
    assert got[PROMPT_IDS] == expected[PROMPT_IDS]
    assert got[GOLD_IDS] == expected[GOLD_IDS]


def test_the_limits_case_drops_rows_and_cuts_answers():
    dataset = Dataset.from_list(ROWS["messages"])
    unlimited = prepare_dataset(dataset, TOKENIZERS["char"], None, None)
    limited = prepare_dataset(dataset, TOKENIZERS["char"], 180, 150)
    assert 0 < len(limited) < len(unlimited)
    golds = dict(zip(map(tuple, unlimited[PROMPT_IDS]), unlimited[GOLD_IDS]))
    cut = [
        len(gold) < len(golds[tuple(prompt)]) for prompt, gold in zip(limited[PROMPT_IDS], limited[GOLD_IDS])
    ]
    assert any(cut) and not all(cut)


def test_two_processes_give_the_same_ids():
    tokenizer = char_tokenizer()
    dataset = Dataset.from_list(ROWS["messages"])
    assert prepare_dataset(dataset, tokenizer, 160, 120, num_proc=2).to_dict() == (
        prepare_dataset(dataset, tokenizer, 160, 120).to_dict()
    )


def test_quick_run_reports_identical_ids(capsys):
    summary = tokenize_rows.main(["--quick", "--tokenizer", "char"])
    assert summary["ids_identical"]
    assert set(summary["speedup"]) == set(tokenize_rows.FORMATS)
    assert capsys.readouterr().out.strip().splitlines()[-1].startswith("{")
    for result in summary["formats"].values():
        # the batched path did CPU work, and spread over the cores it could not be slower than its wall time
        assert result["batched_cpu_s"] > 0
        assert result["speedup_bound"] >= result["speedup"] * 0.9
    assert gc.get_freeze_count() == 0  # the benchmark leaves the collector as it found it
