"""SAPO's sampling loop: ``generate``'s sampling distribution with the attention masks prepared
once per call and the draw made among the tokens that can be drawn.

On a small model a decode step is a few milliseconds of many small operations, and
``generate`` spends a noticeable share of it outside the model: it rebuilds the attention mask
from the 2D padding mask at every token and carries stopping criteria and bookkeeping that
SAPO's calls do not need (docs/performance.md). At a real vocabulary its warpers cost more than
the model: top-p sorts every logit of every row at every token. :func:`sample_tokens` builds the
masks up front (a causal 4D mask for the prefill; one key-visibility tensor that each decode step
slices), runs under ``torch.inference_mode``, draws each token with
:func:`sapo.sampling.draw.draw_next_tokens` (temperature, top-k and top-p applied to the top-k
candidates only: the warpers' distribution, one ``torch.multinomial`` draw from the global
generator) and pads rows that have stopped. On a CPU it runs a plain linear head itself, in the
orientation MKL computes faster for a few rows (:func:`last_position_logits`). Its logits are
``generate``'s, step for step (to float rounding); its tokens for a seed are ``generate``'s only
where the draw is (greedy, or neither top-k nor top-p): ``generation_backend="transformers"``
gives ``generate``'s exact tokens (tests/sampling/test_own_loop.py checks both).

It runs where its logits are ``generate``'s (:func:`supports_cached_loop`): decoder-only models
whose attention takes a custom 4D mask (``sdpa``, ``eager``), with no sliding or chunked window
shorter than the call's sequences, outside ZeRO-3 and FSDP (there ``generate`` keeps the ranks in
step). Elsewhere :class:`sapo.sampling.Sampler` calls ``generate``. Sampling uses exactly the
temperature, top-k and top-p it is given: unlike ``generate``, it does not add processors from
the model's own ``generation_config`` (such as a repetition penalty).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Sequence

import torch
from transformers import DynamicCache
from transformers.integrations import is_deepspeed_zero3_enabled

from sapo.logprobs import chunkable_head, head_inputs
from sapo.packing import PADDING, PREFIX, mask_for, packed_attention_mask, supports_packing, uses_fsdp
from sapo.sampling.draw import draw_next_tokens

# layer kinds whose attention is the ordinary causal attention a 4D mask describes
_ATTENTION_LAYERS = {"full_attention", "sliding_attention", "chunked_attention"}


def supports_cached_loop(model: torch.nn.Module, total_length: int) -> bool:
    """Whether :func:`sample_tokens` computes ``generate``'s logits for sequences of ``total_length``.

    A custom 4D mask replaces the model's own masks, so any window shorter than the sequence
    (which would have hidden the oldest keys) rules the loop out, as do layers that are not
    attention (linear attention, state-space layers) and encoder-decoder models. Under ZeRO-3 or
    FSDP a forward may be collective, and ``generate`` decides how the ranks keep in step: those
    keep ``generate``.
    """
    config = getattr(model, "config", None)
    if config is None or getattr(config, "is_encoder_decoder", False):
        return False
    if not supports_packing(model, max_length=total_length):
        return False
    if any(kind not in _ATTENTION_LAYERS for kind in getattr(config, "layer_types", None) or []):
        return False
    return not (is_deepspeed_zero3_enabled() or uses_fsdp(model))


def _forward_parameters(model: torch.nn.Module):
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT wraps the model
    return inspect.signature(base.forward).parameters


@contextlib.contextmanager
def last_position_logits(model: torch.nn.Module) -> Iterator[Callable[[object], torch.Tensor]]:
    """For the block, a function from a forward's outputs to float32 logits ``(B, V)`` of each
    row's last position.

    On a CPU, where the model's logits are its linear head's product
    (:func:`sapo.logprobs.chunkable_head`), the head runs here as ``weight @ hidden.T`` instead of
    ``nn.Linear``'s ``hidden @ weight.T``: for the few rows of a decode step MKL runs that orientation
    nearly twice as fast (a 151,936-token head, 4 rows, one thread: 8.6 against 15.0 ms of CPU per
    token at hidden size 128, 58 against 110 at 896), and at such a vocabulary the head is most of
    a decode step. The model's forward then gets an empty
    slice for its head. Elsewhere the logits are the model's own.
    """
    head = chunkable_head(model)
    if type(head) is not torch.nn.Linear or head.weight.device.type != "cpu":
        yield lambda outputs: outputs.logits[:, -1].to(dtype=torch.float32)
        return

    def logits(outputs) -> torch.Tensor:
        hidden = recorded.pop()[:, -1]
        if head.bias is None:
            product = torch.mm(head.weight, hidden.T)
        else:
            product = torch.addmm(head.bias[:, None], head.weight, hidden.T)
        return product.T.to(dtype=torch.float32).contiguous()

    with head_inputs(head) as recorded:
        yield logits


@torch.inference_mode()
def sample_tokens(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    limits: torch.Tensor,
    eos_token_ids: Sequence[int],
    pad_token_id: int,
    *,
    temperature: float,
    top_k: int,
    top_p: float,
) -> torch.Tensor:
    """Sample after left-padded ``input_ids`` until each row has ``limits[i]`` tokens or an EOS.

    Returns the new tokens, ``(B, N)`` for the longest row's ``N``; a row that stopped earlier is
    filled with ``pad_token_id``. Draws from the global random generator, as ``generate`` does,
    with ``generate``'s distribution for ``temperature``, ``top_k`` and ``top_p`` (0 and 1: off).
    """
    batch, width = input_ids.shape
    device = input_ids.device
    most = int(limits.max().item())
    if most <= 0:
        return torch.empty((batch, 0), dtype=torch.long, device=device)
    # keys[i, j]: whether position j of row i is a real token; every generated position is
    keys = torch.cat([attention_mask.bool(), torch.ones(batch, most, dtype=torch.bool, device=device)], dim=1)
    # the prefix is one packed "shared prefix" with padding: causal, no padding key, a padding query
    # sees itself only (packed_attention_mask)
    prefill_mask = packed_attention_mask(torch.where(attention_mask.bool(), PREFIX, PADDING))
    decode_mask = mask_for(model, keys[:, None, None, :])
    position_ids = attention_mask.long().cumsum(-1) - 1
    position_ids.masked_fill_(attention_mask == 0, 1)  # what generate gives padding positions

    parameters = _forward_parameters(model)
    cache_argument = "cache" if "cache" in parameters else "past_key_values"
    first = {"logits_to_keep": 1} if "logits_to_keep" in parameters else {}
    cache = DynamicCache(config=model.config)
    next_positions = position_ids[:, -1:] + 1
    stop_ids = torch.tensor(list(eos_token_ids), dtype=torch.long, device=device)
    running = torch.ones(batch, dtype=torch.bool, device=device)
    limits = limits.to(device)
    tokens = []
    with last_position_logits(model) as logits_of:
        outputs = model(
            input_ids=input_ids,
            attention_mask=mask_for(model, prefill_mask),
            position_ids=position_ids,
            use_cache=True,
            **{cache_argument: cache},
            **first,
        )
        for step in range(most):
            drawn = draw_next_tokens(logits_of(outputs), temperature, top_k, top_p)
            drawn = torch.where(running, drawn, pad_token_id)
            tokens.append(drawn)
            running &= ~torch.isin(drawn, stop_ids) & (limits > step + 1)
            if not running.any():
                break
            outputs = model(
                input_ids=drawn[:, None],
                attention_mask=decode_mask[..., : width + step + 1],
                position_ids=next_positions + step,
                use_cache=True,
                **{cache_argument: cache},
            )
    return torch.stack(tokens, dim=1)
