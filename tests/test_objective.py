"""`sapo.objective`: a pair drawn several times in a batch is scored once and counted as often as
drawn, with the loss, gradients and metrics of scoring every draw."""

import copy
import dataclasses

import pytest
import torch
from test_trainer import make_args

import sapo.trainer
from sapo import SAPOTrainer
from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.objective import as_drawn, drawn_batch, preference_objective
from sapo.packing import pack_pairs, packed_completion_logps
from sapo.pairs import Pair
from sapo.scoring import PairScorer, collate_pairs, completion_logps
from sapo.segments import splice

TOKENIZER = char_tokenizer()
PAD, EOS = TOKENIZER.pad_token_id, TOKENIZER.eos_token_id
SCORING = {
    "packed": (pack_pairs, packed_completion_logps),
    "unpacked": (collate_pairs, completion_logps),
}


def pair(prompt, gold, cut, segment):
    rejected = splice(gold, cut, segment, len(segment), EOS)
    return Pair(prompt, gold, rejected)


PAIRS = [
    pair([7, 8, 9, 10], [20, 21, 22, 23, EOS], 1, [30, 31]),
    pair([7], [40, 41, 42, 43, 44, 45, EOS], 0, [50, 51, 52]),
    pair([9, 8, 7, 6, 5, 11], [60, 61, EOS], 1, [62, EOS]),
]
POSITIONS = [1, 0, 1, 2, 1, 0]  # where the drawn pairs sit in the buffer
DRAWS = [PAIRS[position] for position in POSITIONS]


def distinct_pairs(draws, positions=POSITIONS):
    scorer = PairScorer(collate=lambda pairs: {}, score=None, packed=False)
    distinct, batch = drawn_batch(draws, positions, scorer)
    return distinct, batch["drawn_index"]


def test_distinct_pairs_by_buffer_position_in_first_draw_order():
    twin = copy.deepcopy(PAIRS[0])  # equal contents, another entry of the buffer
    distinct, index = distinct_pairs([*DRAWS, twin], [*POSITIONS, 3])
    assert distinct == [PAIRS[1], PAIRS[0], PAIRS[2], twin]
    assert distinct[3] is twin
    assert index.tolist() == [0, 1, 0, 2, 0, 1, 3]
    assert [distinct[i] for i in index] == [*DRAWS, twin]


def objective_and_gradients(model, batch, loss_type, score, rpo_alpha=None):
    model.zero_grad()
    loss, metrics = preference_objective(model, batch, loss_type, 0.1, score, rpo_alpha)
    loss.backward()
    return loss.detach(), metrics, {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.parametrize("scoring", sorted(SCORING))
@pytest.mark.parametrize("loss_type", ["dpo", "orpo"])
def test_scoring_distinct_pairs_equals_scoring_every_draw(loss_type, scoring):
    collate, score = SCORING[scoring]
    model = tiny_llama(TOKENIZER, seed=3, tie_word_embeddings=False)
    every = collate(DRAWS, PAD)
    distinct, index = distinct_pairs(DRAWS)
    once = {**collate(distinct, PAD), "drawn_index": index}
    assert once["input_ids"].shape[0] < every["input_ids"].shape[0]  # fewer rows through the model
    reference = {"ref_chosen_logps": torch.randn(len(DRAWS)), "ref_rejected_logps": torch.randn(len(DRAWS))}
    every.update(reference)
    once.update(reference)
    loss_every, metrics_every, grads_every = objective_and_gradients(model, every, loss_type, score)
    loss_once, metrics_once, grads_once = objective_and_gradients(model, once, loss_type, score)
    torch.testing.assert_close(loss_once, loss_every, atol=1e-6, rtol=1e-6)
    assert metrics_once.keys() == metrics_every.keys()
    for name, value in metrics_every.items():
        assert metrics_once[name].shape == value.shape, name  # one value per draw, as logged before
        torch.testing.assert_close(metrics_once[name], value, atol=1e-5, rtol=1e-6)
    for name, grad in grads_every.items():
        torch.testing.assert_close(grads_once[name], grad, atol=1e-6, rtol=1e-5, msg=name)


def test_without_an_index_rows_come_back_as_scored():
    model = tiny_llama(TOKENIZER, seed=3)
    batch = pack_pairs(PAIRS, PAD)
    with torch.no_grad():
        direct = packed_completion_logps(model, batch)
        wrapped = as_drawn(packed_completion_logps, model, batch)
    for a, b in zip(direct, wrapped):
        assert torch.equal(a, b)


def test_trainer_steps_equal_scoring_every_draw(
    tmp_path, tokenizer, tiny_model, addition_dataset, monkeypatch
):
    """A small buffer makes repeated draws common; training is the same either way.

    Plain SGD: its steps are the gradients themselves, so the weights compare the gradients; Adam
    divides each gradient by its own running scale, which blows float rounding in near-zero
    gradients up to the size of a step."""

    def run(name, every_draw):
        args = make_args(tmp_path / name, max_steps=4, replay_buffer_size=8, logging_steps=1, optim="sgd")
        model, rows = copy.deepcopy(tiny_model), addition_dataset
        trainer = SAPOTrainer(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
        rows = []  # rows of each scored batch
        if every_draw:
            every = lambda drawn, positions, scorer: drawn_batch(drawn, range(len(drawn)), scorer)  # noqa: E731
            monkeypatch.setattr(sapo.trainer, "drawn_batch", every)
        scored = trainer.scorer.collate
        counted = lambda pairs: rows.append(len(pairs)) or scored(pairs)  # noqa: E731
        trainer.scorer = dataclasses.replace(trainer.scorer, collate=counted)
        trainer.train()
        monkeypatch.undo()
        return trainer, rows

    once, rows_once = run("once", every_draw=False)
    every, rows_every = run("every", every_draw=True)
    assert sum(rows_once) < sum(rows_every)  # some batches held repeated draws
    losses = [[entry["loss"] for entry in t.state.log_history if "loss" in entry] for t in (once, every)]
    assert len(losses[0]) == 4
    assert losses[0] == pytest.approx(losses[1], rel=1e-5, abs=1e-6)
    for (name, a), b in zip(once.model.named_parameters(), every.model.parameters()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5, msg=name)


def test_rpo_alpha_adds_the_nll_of_the_scored_chosen_tokens():
    """DPO + rpo_alpha * NLL, the NLL over the chosen tokens past the part both answers share,
    against a direct computation from the model's full logits: same loss, same gradients."""
    from sapo.losses import dpo_loss
    from sapo.scoring import pair_scorer

    model = tiny_llama(TOKENIZER, seed=3, tie_word_embeddings=False)
    scorer = pair_scorer("padded", PAD, [model], None, score_shared_prefix=False)
    batch = scorer.collate(PAIRS)
    batch["ref_chosen_logps"], batch["ref_rejected_logps"] = torch.randn(3), torch.randn(3)
    alpha = 0.7
    loss, metrics = objective_and_gradients(model, batch, "dpo", scorer.score, rpo_alpha=alpha)[:2]
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}

    def summed(pair, side):
        answer = getattr(pair, side)
        logits = model(torch.tensor([pair.prompt_ids + answer])).logits[0].float()
        logps = torch.log_softmax(logits, -1)[len(pair.prompt_ids) - 1 : -1].gather(
            1, torch.tensor(answer)[:, None]
        )
        shared = next((i for i, (a, b) in enumerate(zip(pair.chosen_ids, pair.rejected_ids)) if a != b), None)
        shared = min(len(pair.chosen_ids), len(pair.rejected_ids)) if shared is None else shared
        skip = max(shared, 1 - len(pair.prompt_ids))
        return logps[skip:, 0].sum(), len(answer) - skip

    model.zero_grad()
    chosen = [summed(pair, "chosen_ids") for pair in PAIRS]
    rejected = torch.stack([summed(pair, "rejected_ids")[0] for pair in PAIRS])
    chosen_logps = torch.stack([logp for logp, _ in chosen])
    nll = -chosen_logps.sum() / sum(count for _, count in chosen)
    losses, _, _ = dpo_loss(
        chosen_logps, rejected, batch["ref_chosen_logps"], batch["ref_rejected_logps"], 0.1
    )
    direct = losses.mean() + alpha * nll
    direct.backward()
    torch.testing.assert_close(loss, direct.detach(), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(metrics["nll_loss"], nll.detach(), atol=1e-5, rtol=1e-5)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)
    assert "nll_loss" not in objective_and_gradients(model, batch, "dpo", scorer.score)[1]  # off by default
