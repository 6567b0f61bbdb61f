"""``sapo.policy.eos_token_ids``: one rule for where an answer ends, also where the model's turn-end
token (Llama-3's ``<|eot_id|>``) is not the tokenizer's EOS."""

from __future__ import annotations

import json

import sapo.evaluation.margins
from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.cli import main
from sapo.policy import eos_token_ids
from sapo.sampling import Sampler

TURN_END = "<|eot_id|>"


def llama3_style(tmp_path=None):
    """A tokenizer whose EOS is not the token that ends assistant turns, and a model whose
    generation config ends answers at both (as Llama-3-Instruct's does)."""
    tokenizer = char_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": [TURN_END]})
    turn_end = tokenizer.convert_tokens_to_ids(TURN_END)
    model = tiny_llama(tokenizer, seed=0)
    model.generation_config.eos_token_id = [turn_end, tokenizer.eos_token_id]
    if tmp_path is not None:
        model.save_pretrained(tmp_path)
        tokenizer.save_pretrained(tmp_path)
    return model, tokenizer, turn_end


def only_say(model, token: int) -> None:
    """Make ``model`` give ``token`` all the probability at every position."""

    def hook(module, args, output):
        output.logits.fill_(-1e4)[..., token] = 0.0

    model.register_forward_hook(hook)


def test_eos_token_ids_holds_the_turn_end_and_the_eos():
    model, tokenizer, turn_end = llama3_style()
    assert eos_token_ids(model, tokenizer) == sorted({turn_end, tokenizer.eos_token_id})


def test_a_segment_stops_at_the_turn_end_token():
    model, tokenizer, turn_end = llama3_style()
    # the model can only say the turn-end token: a segment must stop after it
    only_say(model, turn_end)
    sampler = Sampler(tokenizer.pad_token_id, eos_token_ids(model, tokenizer), seed=0)
    segments = sampler.generate(model, [[10, 11, 12], [13, 14]], [5, 5])
    assert segments == [[turn_end], [turn_end]]
    # with the tokenizer's EOS alone the same call would run to its limit
    alone = Sampler(tokenizer.pad_token_id, [tokenizer.eos_token_id], seed=0)
    assert alone.generate(model, [[10, 11, 12]], [5]) == [[turn_end] * 5]


def test_sapo_eval_ends_answers_where_training_does(tmp_path, monkeypatch):
    model, tokenizer, turn_end = llama3_style(tmp_path / "model")
    seen = []

    class Recording(sapo.evaluation.margins.Sampler):
        def __post_init__(self):
            super().__post_init__()
            seen.append(list(self.eos_token_ids))

    monkeypatch.setattr(sapo.evaluation.margins, "Sampler", Recording)
    output = tmp_path / "eval.json"
    status = main(
        ["eval", "--model_name_or_path", str(tmp_path / "model"), "--dataset_name", "builtin:multiplication",
         "--max_rows", "4", "--segment_length", "3", "--output_file", str(output)]
    )  # fmt: skip
    assert status == 0 and json.loads(output.read_text())["rows"] == 4
    assert seen and all(ids == eos_token_ids(model, tokenizer) for ids in seen)
    assert turn_end in seen[0]
