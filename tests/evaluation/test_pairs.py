"""pairs.jsonl: the differing span of a spliced pair, its decoding with marks, and the callback
that writes the records and hands them to the table backends."""

import dataclasses
import json
import sys
import types

import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, TrainerControl, TrainerState, TrainingArguments

from sapo.evaluation.pairs import CLOSE, OPEN, PairLogCallback, describe_pair, differing_span, log_table
from sapo.pairs import Pair
from sapo.segments import splice

EOS = 0


@settings(max_examples=200, deadline=None)
@given(
    gold=st.lists(st.integers(1, 4), min_size=1, max_size=12).map(lambda ids: ids + [EOS]),
    segment=st.lists(st.integers(0, 4), min_size=1, max_size=6),
    segment_length=st.integers(1, 6),
    cut_seed=st.integers(0, 10**6),
)
def test_the_differing_span_is_inside_the_rewritten_window_and_rebuilds_the_rejected(
    gold, segment, segment_length, cut_seed
):
    window = min(segment_length, len(gold))
    cut = torch.randint(
        0, len(gold) - window + 1, (1,), generator=torch.Generator().manual_seed(cut_seed)
    ).item()
    segment = segment[:window]
    assume(len(segment) == window or EOS in segment)  # sampling stops early only at EOS
    rejected = splice(gold, cut, segment, segment_length, EOS)
    start, rejected_end, chosen_end = differing_span(gold, rejected)
    assert rejected == gold[:start] + rejected[start:rejected_end] + gold[chosen_end:]
    if rejected != gold:
        assert start >= cut  # the gold prefix is never marked
        if EOS not in segment:
            assert chosen_end <= cut + window  # nor the gold tail after the window
        # the span starts where the answers differ
        assert start == min(len(gold), len(rejected)) or gold[start] != rejected[start]


def test_equal_answers_have_an_empty_span():
    assert differing_span([5, 6, EOS], [5, 6, EOS]) == (3, 3, 3)


def token_ids(tokenizer, text):
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_a_pair_reads_with_its_rewritten_span_marked(tokenizer):
    eos = tokenizer.eos_token_id
    prompt = token_ids(tokenizer, "<|user|>12*11=<|end|><|assistant|>")
    pair = Pair(prompt, token_ids(tokenizer, "132") + [eos], token_ids(tokenizer, "1x72") + [eos], step=7)
    record = describe_pair(pair, tokenizer)
    assert record == {
        "generated_at_step": 7,
        "prompt": "12*11=",
        "chosen": "132",
        "rejected": f"1{OPEN}x7{CLOSE}2",
        "gold_span": "3",
        "rewritten_span": "x7",
        "identical": False,
    }
    same = describe_pair(dataclasses.replace(pair, rejected_ids=pair.chosen_ids), tokenizer)
    assert same["identical"] and same["rejected"] == "132" and same["rewritten_span"] == ""


def word_tokenizer():
    """Words with SentencePiece's leading-space marker, whose decoder drops a first space."""
    vocab = {"<pad>": 0, "</s>": 1, "▁the": 2, "▁cat": 3, "▁dog": 4, "▁sat": 5}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="</s>")


def test_marks_keep_the_spacing_of_the_whole_answer():
    tokenizer = word_tokenizer()
    pair = Pair([2], [2, 3, 5, 1], [2, 4, 5, 1])
    record = describe_pair(pair, tokenizer)
    assert record["chosen"] == "the cat sat"
    assert record["rejected"] == f"the{OPEN} dog{CLOSE} sat"
    assert record["rejected"].replace(OPEN, "").replace(CLOSE, "") == "the dog sat"


def callback_run(tmp_path, tokenizer, pairs, steps, every, world_zero=True, max_steps=0):
    args = TrainingArguments(output_dir=str(tmp_path / "run"), report_to="none")
    callback = PairLogCallback(tokenizer, lambda: pairs, every=every, count=2)
    state = TrainerState(is_world_process_zero=world_zero, max_steps=max_steps)
    for step in range(1, steps + 1):
        state.global_step = step
        callback.on_step_end(args, state, TrainerControl())
    return tmp_path / "run" / "pairs.jsonl"


def spliced_pairs(tokenizer, count):
    ids = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    eos = tokenizer.eos_token_id
    return [
        Pair(
            ids(f"{i}+1="),
            ids(str(i + 1)) + [eos],
            ids("9") + [eos],
            step=i,
        )
        for i in range(count)
    ]


def test_the_callback_appends_the_newest_pairs_every_n_steps(tmp_path, tokenizer):
    path = callback_run(tmp_path, tokenizer, spliced_pairs(tokenizer, 5), steps=7, every=3)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [record["step"] for record in records] == [3, 3, 6, 6]
    assert [record["generated_at_step"] for record in records] == [3, 4, 3, 4]  # the newest two
    assert records[0]["rejected"] == f"{OPEN}9{CLOSE}"


def test_the_last_step_of_a_run_logs_its_pairs_too(tmp_path, tokenizer):
    pairs = spliced_pairs(tokenizer, 5)
    path = callback_run(tmp_path, tokenizer, pairs, steps=4, every=100, max_steps=4)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert [record["step"] for record in records] == [4, 4]  # a 4-step run with the default of 100
    assert [record["generated_at_step"] for record in records] == [3, 4]


def test_only_the_main_process_writes(tmp_path, tokenizer):
    path = callback_run(tmp_path, tokenizer, spliced_pairs(tokenizer, 3), steps=4, every=2, world_zero=False)
    assert not path.exists()


def test_tables_go_only_to_the_running_backends_of_report_to(monkeypatch):
    # the real runs of test_trackers.py show the tables W&B and trackio receive; stand-ins that log
    # whatever they are given show what a run with both of them cannot: a backend left out of
    # report_to, or W&B without a run, receives nothing
    logged = []
    wandb = types.SimpleNamespace(run=None, Table=dict, log=lambda values: logged.append(("wandb", values)))
    trackio = types.SimpleNamespace(Table=dict, log=lambda values: logged.append(("trackio", values)))
    monkeypatch.setitem(sys.modules, "wandb", wandb)
    monkeypatch.setitem(sys.modules, "trackio", trackio)
    records = [{"prompt": "1+1=", "rejected": "⟦3⟧"}]
    log_table(["tensorboard"], "sapo/pairs", records)
    log_table(["wandb"], "sapo/pairs", records)
    assert logged == []
    wandb.run = object()
    log_table(["wandb"], "sapo/pairs", records)
    table = {"columns": ["prompt", "rejected"], "data": [["1+1=", "⟦3⟧"]]}
    assert logged == [("wandb", {"sapo/pairs": table})]  # the stand-in does log when it should
