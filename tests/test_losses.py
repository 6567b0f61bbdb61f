"""`sapo.losses`: DPO and ORPO against hand-computed numbers, `log1mexp` accuracy, parity with TRL."""

import math
import types

import mpmath
import pytest
import torch
from datasets import Dataset

from sapo.builtin.tiny import tiny_llama
from sapo.losses import AVERAGE_LOGP_CEILING, dpo_loss, log1mexp, orpo_loss
from sapo.pairs import Pair
from sapo.scoring import collate_pairs, completion_logps


def t(*values, dtype=torch.float32, requires_grad=False):
    return torch.tensor(values, dtype=dtype, requires_grad=requires_grad)


def neg_log_sigmoid(z: float) -> float:
    # -log σ(z) = log(1 + e^{-z})
    return math.log1p(math.exp(-z))


# ----------------------------------------------------------------------------------------------
# DPO: hand-computed
# ----------------------------------------------------------------------------------------------


def test_dpo_loss_hand_computed():
    # Example 1: β=0.1, π(c)=-5, π(r)=-7, ref(c)=-6, ref(r)=-6
    #   chosen log-ratio  = -5 - (-6) =  1
    #   rejected log-ratio = -7 - (-6) = -1
    #   z = 0.1 * (1 - (-1)) = 0.2 ;  loss = -log σ(0.2) = log(1 + e^{-0.2})
    loss1 = math.log(1 + math.exp(-0.2))
    # Example 2: π(c)=-10, π(r)=-2, ref(c)=-4, ref(r)=-3
    #   chosen log-ratio = -6, rejected log-ratio = 1, z = 0.1 * (-7) = -0.7
    #   loss = log(1 + e^{0.7})
    loss2 = math.log(1 + math.exp(0.7))
    # Example 3: the policy equals the reference: z = 0, loss = log 2
    loss3 = math.log(2)

    losses, chosen_rewards, rejected_rewards = dpo_loss(
        t(-5.0, -10.0, -3.0), t(-7.0, -2.0, -8.0), t(-6.0, -4.0, -3.0), t(-6.0, -3.0, -8.0), beta=0.1
    )
    assert losses.shape == (3,)
    torch.testing.assert_close(losses, t(loss1, loss2, loss3), rtol=1e-6, atol=1e-6)
    # rewards are β (log π - log π_ref)
    torch.testing.assert_close(chosen_rewards, t(0.1 * 1, 0.1 * -6, 0.0), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rejected_rewards, t(0.1 * -1, 0.1 * 1, 0.0), rtol=1e-6, atol=1e-6)


def test_dpo_loss_beta_scales_the_margin():
    # β = 0.5, π(c)=-1, π(r)=-4, ref(c)=-2, ref(r)=-2: margin = 1 - (-2) = 3, z = 1.5
    losses, chosen_rewards, rejected_rewards = dpo_loss(t(-1.0), t(-4.0), t(-2.0), t(-2.0), beta=0.5)
    assert losses.item() == pytest.approx(math.log(1 + math.exp(-1.5)), rel=1e-6)
    assert chosen_rewards.item() == pytest.approx(0.5, rel=1e-6)
    assert rejected_rewards.item() == pytest.approx(-1.0, rel=1e-6)


def test_dpo_loss_gradient_and_detached_rewards():
    # d/dπ(c) [-log σ(β m)] = -β σ(-β m) ; d/dπ(r) = +β σ(-β m)
    policy_chosen = t(-5.0, -10.0, requires_grad=True)
    policy_rejected = t(-7.0, -2.0, requires_grad=True)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_chosen, policy_rejected, t(-6.0, -4.0), t(-6.0, -3.0), beta=0.1
    )
    losses.sum().backward()
    sigma = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = t(-0.1 * sigma(-0.2), -0.1 * sigma(0.7))
    torch.testing.assert_close(policy_chosen.grad, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(policy_rejected.grad, -expected, rtol=1e-6, atol=1e-7)
    assert not chosen_rewards.requires_grad and not rejected_rewards.requires_grad


def test_dpo_loss_large_margins_are_finite():
    losses, _, _ = dpo_loss(t(0.0, -5000.0), t(-5000.0, 0.0), t(0.0, 0.0), t(0.0, 0.0), beta=1.0)
    assert torch.isfinite(losses).all()
    assert losses[0].item() == pytest.approx(0.0, abs=1e-6)
    assert losses[1].item() == pytest.approx(5000.0, rel=1e-6)


# ----------------------------------------------------------------------------------------------
# ORPO: hand-computed
# ----------------------------------------------------------------------------------------------


def test_orpo_loss_hand_computed():
    beta = 0.05
    # Example 1: ℓ(c) = -0.5, ℓ(r) = -2.0, NLL(c) = 0.5
    #   log_odds(c) = -0.5 - log(1 - e^{-0.5})
    #   log_odds(r) = -2.0 - log(1 - e^{-2.0})
    #   Δ = log_odds(c) - log_odds(r) ; ratio = log σ(Δ) ; loss = 0.5 - 0.05 ratio
    lo_c1 = -0.5 - math.log(1 - math.exp(-0.5))
    lo_r1 = -2.0 - math.log(1 - math.exp(-2.0))
    d1 = lo_c1 - lo_r1
    ratio1 = -math.log(1 + math.exp(-d1))
    loss1 = 0.5 - beta * ratio1
    # Example 2: rejected more likely than chosen: ℓ(c) = -3.0, ℓ(r) = -0.1, NLL(c) = 3.0
    lo_c2 = -3.0 - math.log(1 - math.exp(-3.0))
    lo_r2 = -0.1 - math.log(1 - math.exp(-0.1))
    d2 = lo_c2 - lo_r2
    ratio2 = -math.log(1 + math.exp(-d2))
    loss2 = 3.0 - beta * ratio2
    # Example 3: equal: Δ = 0, ratio = -log 2, loss = NLL + β log 2
    loss3 = 1.25 + beta * math.log(2)

    losses, log_odds_ratio, log_odds_chosen = orpo_loss(
        t(0.5, 3.0, 1.25), t(-0.5, -3.0, -1.0), t(-2.0, -0.1, -1.0), beta=beta
    )
    torch.testing.assert_close(losses, t(loss1, loss2, loss3), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_odds_ratio, t(ratio1, ratio2, -math.log(2)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log_odds_chosen, t(d1, d2, 0.0), rtol=1e-5, atol=1e-5)
    # sanity of the hand numbers themselves: example 1 favours the chosen answer, example 2 does not
    assert d1 > 0 > d2


def test_orpo_loss_scalar_nll_broadcasts_and_beta_scales():
    # NLL given as one scalar for the batch
    chosen, rejected = t(-0.7, -1.5), t(-1.2, -0.3)
    losses, ratio, _ = orpo_loss(torch.tensor(2.0), chosen, rejected, beta=1.0)
    assert losses.shape == (2,)
    torch.testing.assert_close(losses, 2.0 - ratio)
    losses_small_beta, ratio_again, _ = orpo_loss(torch.tensor(2.0), chosen, rejected, beta=0.05)
    torch.testing.assert_close(ratio_again, ratio)
    torch.testing.assert_close(losses_small_beta, 2.0 - 0.05 * ratio)


def test_orpo_loss_gradient_hand_computed():
    # d loss / d ℓ(c) = -β σ(-Δ) dΔ/dℓ(c), with dΔ/dℓ(c) = 1 + e^{ℓ}/(1 - e^{ℓ}) = 1/(1 - e^{ℓ})
    beta = 0.05
    chosen = t(-0.5, requires_grad=True)
    rejected = t(-2.0, requires_grad=True)
    nll = t(0.5, requires_grad=True)
    losses, ratio, log_odds = orpo_loss(nll, chosen, rejected, beta=beta)
    losses.sum().backward()
    d = log_odds.item()
    sig_neg = 1 / (1 + math.exp(d))
    assert chosen.grad.item() == pytest.approx(-beta * sig_neg / (1 - math.exp(-0.5)), rel=1e-5)
    assert rejected.grad.item() == pytest.approx(beta * sig_neg / (1 - math.exp(-2.0)), rel=1e-5)
    assert nll.grad.item() == pytest.approx(1.0)
    assert not ratio.requires_grad and not log_odds.requires_grad


def test_orpo_loss_extreme_log_probs_are_finite():
    # ℓ very close to 0 (near-certain answer, still below the cap) and very negative
    chosen = t(-1e-5, -60.0, -1e-3)
    rejected = t(-60.0, -1e-5, -1e-3)
    losses, ratio, log_odds = orpo_loss(t(0.0, 0.0, 0.0), chosen, rejected, beta=0.1)
    assert torch.isfinite(losses).all() and torch.isfinite(ratio).all() and torch.isfinite(log_odds).all()
    # log_odds(-1e-5) = -1e-5 - log(1 - e^{-1e-5}) ≈ -log(1e-5) = 11.513 (naive log1p(-exp) is
    # off in the 4th digit here); log_odds(-60) ≈ -60
    expected = (-1e-5 - math.log(-math.expm1(-1e-5))) - (-60.0 - math.log1p(-math.exp(-60.0)))
    assert log_odds[0].item() == pytest.approx(expected, rel=1e-5)
    assert log_odds[1].item() == pytest.approx(-expected, rel=1e-5)
    assert log_odds[2].item() == 0.0


def test_orpo_loss_and_gradients_stay_finite_for_certain_answers():
    # a converged model gives a short gold answer average log-prob 0.0 in float32, and SAPO's
    # rewrite can equal the gold answer: log(1 - e^0) = -inf, and -inf - -inf = NaN without a cap
    chosen = torch.tensor([0.0, 0.0, -1e-9, -2.0], requires_grad=True)
    rejected = torch.tensor([0.0, -3.0, -1e-9, 0.0], requires_grad=True)
    losses, ratio, log_odds = orpo_loss(t(0.0, 0.0, 0.0, 0.0), chosen, rejected, beta=0.5)
    losses.sum().backward()
    for tensor in (losses, ratio, log_odds, chosen.grad, rejected.grad):
        assert torch.isfinite(tensor).all(), tensor
    assert log_odds[0].item() == 0.0 and log_odds[2].item() == 0.0  # identical answers: no preference
    ceiling = AVERAGE_LOGP_CEILING
    assert log_odds[1].item() == pytest.approx(
        (ceiling - math.log(-math.expm1(ceiling))) - (-3.0 - math.log1p(-math.exp(-3.0))), rel=1e-5
    )
    assert log_odds[3].item() == pytest.approx(
        -(ceiling - math.log(-math.expm1(ceiling))) + (-2.0 - math.log1p(-math.exp(-2.0))), rel=1e-5
    )
    # below the cap nothing changes: the gradient still flows
    assert rejected.grad[1].item() != 0.0 and chosen.grad[3].item() != 0.0


def test_log1mexp_gradient_is_finite_on_both_branches():
    x = torch.tensor([-1e-6, -0.5, -0.7, -5.0, -100.0], requires_grad=True)
    log1mexp(x).sum().backward()
    assert torch.isfinite(x.grad).all()
    expected = [math.exp(v) / math.expm1(v) for v in (-1e-6, -0.5, -0.7, -5.0, -100.0)]  # d/dx log(1-e^x)
    assert x.grad.tolist() == pytest.approx(expected, rel=1e-4)


def test_orpo_loss_bf16_inputs_computed_in_fp32():
    chosen, rejected = t(-0.5, -3.0), t(-2.0, -0.1)
    ref_losses, ref_ratio, ref_odds = orpo_loss(
        t(0.0, 0.0), chosen.bfloat16().float(), rejected.bfloat16().float(), 0.1
    )
    losses, ratio, odds = orpo_loss(t(0.0, 0.0), chosen.bfloat16(), rejected.bfloat16(), 0.1)
    assert ratio.dtype == torch.float32 and odds.dtype == torch.float32
    torch.testing.assert_close(ratio, ref_ratio)
    torch.testing.assert_close(odds, ref_odds)


# ----------------------------------------------------------------------------------------------
# log1mexp
# ----------------------------------------------------------------------------------------------


def _grid() -> list[float]:
    xs = [-(10.0**k) for k in range(-30, 3)]  # -1e-30 ... -100
    xs += [-0.6931471805599453 + d for d in (-1e-6, -1e-9, 0.0, 1e-9, 1e-6)]  # around the branch point
    xs += [-0.01 * i for i in range(1, 300, 7)] + [-5.0, -10.0, -20.0, -36.0, -50.0, -87.0]
    return sorted(set(xs))


def _exact(x: float) -> float:
    with mpmath.workdps(60):
        return float(mpmath.log(1 - mpmath.exp(mpmath.mpf(x))))


def test_log1mexp_float64_matches_exact():
    xs = _grid()
    got = log1mexp(torch.tensor(xs, dtype=torch.float64))
    assert got.dtype == torch.float64
    exact = torch.tensor([_exact(x) for x in xs], dtype=torch.float64)
    torch.testing.assert_close(got, exact, rtol=1e-12, atol=0.0)
    # near 0 the naive formula loses everything; the stable one still has ~full precision
    assert got[xs.index(-1e-20)].item() == pytest.approx(math.log(1e-20), rel=1e-12)


def test_log1mexp_float32_accuracy_against_float64():
    xs = [x for x in _grid() if x > -87.0]  # e^x stays a normal float32
    x32 = torch.tensor(xs, dtype=torch.float32)
    got = log1mexp(x32)
    assert got.dtype == torch.float32
    # reference: exact value at the float32 input, computed in float64 via mpmath
    exact = torch.tensor([_exact(float(x)) for x in x32.tolist()], dtype=torch.float64)
    assert torch.isfinite(got).all()
    rel = ((got.double() - exact).abs() / exact.abs()).max().item()
    assert rel < 1e-6


def test_log1mexp_float64_agrees_with_naive_formula_where_naive_is_fine():
    # moderate x: log(1 - exp(x)) in float64 is accurate; the two must agree
    xs = torch.linspace(-30.0, -0.05, 500, dtype=torch.float64)
    naive = torch.log(1 - torch.exp(xs))
    torch.testing.assert_close(log1mexp(xs), naive, rtol=1e-10, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# Parity with TRL's ORPO
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("beta", [0.05, 0.1, 1.0])
def test_orpo_matches_trl_odds_ratio_loss(beta):
    from trl.experimental.orpo import ORPOTrainer

    generator = torch.Generator().manual_seed(int(beta * 100))
    # average log-probs: negative, from near 0 to quite unlikely
    chosen = -torch.rand(16, generator=generator) * 4 - 1e-4
    rejected = -torch.rand(16, generator=generator) * 4 - 1e-4
    chosen[0], rejected[0] = -1e-6, -30.0
    chosen_nll = torch.rand(16, generator=generator) * 3

    fake_self = types.SimpleNamespace(
        beta=beta, accelerator=types.SimpleNamespace(device=torch.device("cpu"))
    )
    trl_losses, _, _, trl_ratio_mean, trl_log_odds_mean = ORPOTrainer.odds_ratio_loss(
        fake_self, chosen, rejected
    )

    losses, log_odds_ratio, log_odds_chosen = orpo_loss(chosen_nll, chosen, rejected, beta)
    # TRL returns β·log σ(Δ) (to be subtracted from the NLL); ours is NLL - β·log σ(Δ)
    torch.testing.assert_close(losses - chosen_nll, -trl_losses, rtol=1e-5, atol=1e-5)
    assert log_odds_ratio.mean().item() == pytest.approx(trl_ratio_mean.item(), abs=1e-5)
    assert log_odds_chosen.mean().item() == pytest.approx(trl_log_odds_mean.item(), abs=1e-5)


# ----------------------------------------------------------------------------------------------
# Parity with TRL's DPOTrainer on a real batch
# ----------------------------------------------------------------------------------------------


PLAIN_ROWS = [
    {"prompt": "12+34=", "chosen": "46", "rejected": "47"},
    {"prompt": "5+5=", "chosen": "10", "rejected": "1000"},
    {"prompt": "99+1=", "chosen": "100", "rejected": "9"},
    {"prompt": "7+8=", "chosen": "15", "rejected": "78 is the sum"},
]


def _conversational(rows):
    return [
        {
            "prompt": [{"role": "user", "content": row["prompt"]}],
            "chosen": [{"role": "assistant", "content": row["chosen"]}],
            "rejected": [{"role": "assistant", "content": row["rejected"]}],
        }
        for row in rows
    ]


def _pairs_from_trl_batch(batch):
    """Split TRL's collated batch back into per-pair token ids (rows [:B] chosen, [B:] rejected)."""
    input_ids, attention, completion = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    assert input_ids.shape[0] % 2 == 0
    b = input_ids.shape[0] // 2

    def split(row):
        ids = input_ids[row][attention[row].bool()].tolist()
        mask = completion[row][attention[row].bool()].tolist()
        start = mask.index(1)
        assert all(mask[start:]) and not any(mask[:start])
        return ids[:start], ids[start:]

    pairs = []
    for i in range(b):
        prompt, chosen = split(i)
        prompt_again, rejected = split(b + i)
        assert prompt == prompt_again  # the same pair's two halves share the prompt
        pairs.append(Pair(prompt, chosen, rejected))
    return pairs


@pytest.mark.parametrize("conversational", [False, True], ids=["plain", "conversational"])
def test_dpo_matches_trl_dpo_trainer(tmp_path, tokenizer, conversational):
    from trl import DPOConfig, DPOTrainer

    policy = tiny_llama(tokenizer, seed=1)
    reference = tiny_llama(tokenizer, seed=2)  # a different model, so the reference terms matter
    rows = _conversational(PLAIN_ROWS) if conversational else PLAIN_ROWS
    args = DPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        report_to="none",
        beta=0.1,
        bf16=False,  # TRL defaults bf16 to True, which would autocast the forward
        gradient_checkpointing=False,  # TRL defaults it to True
        per_device_train_batch_size=len(rows),
        seed=0,
    )
    trainer = DPOTrainer(
        model=policy,
        ref_model=reference,
        args=args,
        train_dataset=Dataset.from_list(rows),
        processing_class=tokenizer,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    assert set(batch) >= {"input_ids", "attention_mask", "completion_mask"}
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, batch).item()

    pairs = _pairs_from_trl_batch(batch)
    assert len(pairs) == len(rows)
    ours = collate_pairs(pairs, pad_token_id=tokenizer.pad_token_id)
    # our collation reproduces TRL's on the same pairs (same order, same padding side)
    for key in ("input_ids", "attention_mask", "completion_mask"):
        assert torch.equal(ours[key], batch[key]), key

    with torch.no_grad():
        policy_logps, _ = completion_logps(trainer.model, ours)
        ref_logps, _ = completion_logps(trainer.ref_model, ours)
    b = len(pairs)
    losses, chosen_rewards, rejected_rewards = dpo_loss(
        policy_logps[:b], policy_logps[b:], ref_logps[:b], ref_logps[b:], beta=0.1
    )
    assert losses.mean().item() == pytest.approx(trl_loss, abs=1e-5)

    # the reference really matters here: ignoring it gives a visibly different loss
    no_ref, _, _ = dpo_loss(policy_logps[:b], policy_logps[b:], torch.zeros(b), torch.zeros(b), beta=0.1)
    assert abs(no_ref.mean().item() - trl_loss) > 1e-3

    # the rewards TRL logs for this batch
    metrics = trainer._metrics["train"]
    assert chosen_rewards.mean().item() == pytest.approx(metrics["rewards/chosen"][-1], abs=1e-5)
    assert rejected_rewards.mean().item() == pytest.approx(metrics["rewards/rejected"][-1], abs=1e-5)
    assert policy_logps[:b].mean().item() == pytest.approx(metrics["logps/chosen"][-1], abs=1e-4)
    assert policy_logps[b:].mean().item() == pytest.approx(metrics["logps/rejected"][-1], abs=1e-4)
