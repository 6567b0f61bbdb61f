"""Log-probs of given tokens at given positions of a causal LM, without its full logits.

At real vocabularies the logits are the largest tensors of a scoring forward: 8 rows of 512
positions over 151,936 tokens are 2.5 GB in float32, and their log-softmax and its gradient as
much again. :func:`position_logps` takes instead the hidden states the model's output layer (the
LM head) reads, keeps the scored positions, and runs the head on them ``chunk_size`` positions
at a time: each chunk's logits are reduced to the log-probs of its targets and freed before the
next, and the backward recomputes them chunk by chunk. The head then never holds more than one
chunk's logits, whatever the batch.

The chunked path runs only where it computes exactly what the model's own forward would
(:func:`chunkable_head`): a model class whose logits are ``lm_head(hidden)`` and nothing more
(no soft-capping or scaling after the head), a head that is an ``nn.Linear`` or a PEFT adapter
layer around one, and head weights that live whole in this process. FSDP shards and ZeRO-3
partitions do not: their gathering hooks run only inside a module's own forward. Everywhere
else the model computes the logits of the kept positions itself, as it always did.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.distributed.fsdp import FSDPModule
from torch.utils.checkpoint import checkpoint
from transformers.integrations.fsdp import is_fsdp_managed_module
from trl.trainer.utils import selective_log_softmax

from sapo.policy import is_peft_model

# transformers causal LMs whose forward returns ``lm_head(hidden_states[:, -logits_to_keep:])`` as
# its logits, nothing applied after the head (tests/test_logprobs.py checks each against its logits)
PLAIN_HEAD_MODELS = frozenset(
    {
        "LlamaForCausalLM",
        "MistralForCausalLM",
        "MixtralForCausalLM",
        "Qwen2ForCausalLM",
        "Qwen2MoeForCausalLM",
        "Qwen3ForCausalLM",
        "Qwen3MoeForCausalLM",
        "Phi3ForCausalLM",
        "GemmaForCausalLM",
        "Olmo2ForCausalLM",
        "SmolLM3ForCausalLM",
    }
)


def uses_fsdp(model: nn.Module) -> bool:
    """Whether FSDP manages the model or any part of it (accelerate's FSDP2 marks only the parts)."""
    if is_fsdp_managed_module(model):
        return True
    return any(isinstance(module, FSDPModule) for module in model.modules())


def _causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP or DeepSpeed (``.module``) and PEFT wrappers."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model.get_base_model() if is_peft_model(model) else model


def chunkable_head(model: nn.Module) -> nn.Module | None:
    """The LM head of ``model`` when :func:`position_logps` may run it in chunks, else ``None``.

    Chunks need the model's logits to be exactly the head applied to the last hidden state
    (:data:`PLAIN_HEAD_MODELS`; Gemma 2's soft-capping or Cohere's logit scale would be skipped;
    no forward hook on the model, which may change them),
    a head computing each position on its own (``nn.Linear``, or a PEFT layer such as LoRA around
    one), and the head's weights whole in this process and in place (not under FSDP or ZeRO-3,
    not dispatched by accelerate's ``device_map``, whose hooks move or load weights in the forward).
    """
    causal_lm = _causal_lm(model)
    kind = type(causal_lm)
    if kind.__name__ not in PLAIN_HEAD_MODELS or not kind.__module__.startswith("transformers."):
        return None
    head = causal_lm.get_output_embeddings()
    if model._forward_hooks or causal_lm._forward_hooks:  # a hook on the outputs may change the logits
        return None
    if uses_fsdp(model) or any(hasattr(weight, "ds_id") for weight in head.parameters()):
        return None
    if hasattr(head, "_hf_hook"):  # placed by accelerate (device_map, offloading): weights may move
        return None
    if type(head) is nn.Linear:
        return head
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(head, BaseTunerLayer) and type(head.get_base_layer()) is nn.Linear:
        return head
    return None


@contextlib.contextmanager
def head_inputs(head: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Record what ``head`` is called with in the block, and hand it an empty slice instead:
    the model's forward then computes no logits, and the recorded hidden states are scored here."""
    recorded: list[torch.Tensor] = []

    def record(module, args):
        recorded.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(record)
    try:
        yield recorded
    finally:
        handle.remove()


def position_logps(
    model: nn.Module,
    inputs: dict[str, torch.Tensor],
    targets: torch.Tensor,
    positions: torch.Tensor,
    chunk_size: int | None,
) -> torch.Tensor:
    """Float32 ``(N, S)`` log-probs of the targets of the scored ``positions`` ``(N,)``.

    ``inputs`` are the model's forward arguments, ``input_ids`` of shape ``(rows, width)``.
    ``targets`` ``(rows, K, S)`` holds the ``S`` tokens each of a row's last ``K``
    positions predicts; ``positions`` index that grid flattened (``row * K + k``). With
    ``chunk_size`` (positions per chunk) and a :func:`chunkable_head`, the head runs on the scored
    positions only, chunk by chunk (:func:`token_logps`); otherwise (``chunk_size`` 0 or ``None``,
    or a model the chunks would not reproduce) the model computes the logits of the last ``K``
    positions itself and the scored ones are read from them.
    """
    keep = targets.shape[1]
    trimmed = {"logits_to_keep": keep} if keep < inputs["input_ids"].shape[1] else {}
    head = chunkable_head(model) if chunk_size else None
    if head is None:
        logits = model(**inputs, use_cache=False, **trimmed).logits
        return selective_log_softmax(logits, targets).float().flatten(0, 1).index_select(0, positions)
    with head_inputs(head) as recorded:
        model(**inputs, use_cache=False, **trimmed)
    if len(recorded) != 1:
        raise RuntimeError(f"the LM head ran {len(recorded)} times in one forward; expected once")
    hidden = recorded[0].flatten(0, 1).index_select(0, positions)
    return token_logps(hidden, head, targets.flatten(0, 1).index_select(0, positions), chunk_size)


def token_logps(
    hidden: torch.Tensor, head: nn.Module, targets: torch.Tensor, chunk_size: int
) -> torch.Tensor:
    """``log_softmax(head(hidden))`` at ``targets``: float32 ``(N, S)`` for ``hidden`` ``(N, H)``
    and ``targets`` ``(N, S)``, computed ``chunk_size`` positions at a time.

    An ``nn.Linear`` head goes through :class:`_LinearTokenLogps` (one chunk of logits alive at a
    time, forward and backward); another head (a LoRA layer) through checkpointed chunks, which
    keep a few chunks' worth in the backward.
    """
    if type(head) is nn.Linear:
        return _LinearTokenLogps.apply(hidden, head.weight, head.bias, targets, chunk_size)
    chunks = zip(hidden.split(chunk_size), targets.split(chunk_size))
    if not (
        torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad for p in head.parameters()))
    ):
        return torch.cat([_chunk_logps(head, h, t) for h, t in chunks])
    return torch.cat([checkpoint(_chunk_logps, head, h, t, use_reentrant=False) for h, t in chunks])


def _chunk_logps(head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    logits = head(hidden).float()
    return logits.gather(1, targets) - logits.logsumexp(dim=1, keepdim=True)


def _compute_dtype(tensor: torch.Tensor) -> torch.dtype:
    """The dtype the head's matrix product runs in: autocast's where it is on, else the input's."""
    device = tensor.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else tensor.dtype


class _ChunkBuffers:
    """One chunk's logits, allocated once per call and reused by every chunk: on CPU a fresh
    allocation of that size is mapped anew each time, and its page faults cost as much as the
    softmax over it. ``product`` holds the matrix product in its dtype, ``floats`` the float32
    logits (the same buffer when the product runs in float32)."""

    def __init__(self, positions: int, weight: torch.Tensor, bias: torch.Tensor | None, dtype, device):
        self.weight = weight.to(dtype)
        self.bias = None if bias is None else bias.to(dtype)
        shape = (positions, weight.shape[0])
        self.product = torch.empty(shape, dtype=dtype, device=device)
        self.floats = (
            self.product if dtype == torch.float32 else torch.empty(shape, dtype=torch.float32, device=device)
        )

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Float32 ``hidden @ weight.T + bias``, in the buffers (valid until the next call)."""
        out = self.product[: hidden.shape[0]]
        if self.bias is None:
            torch.mm(hidden, self.weight.T, out=out)
        else:
            torch.addmm(self.bias, hidden, self.weight.T, out=out)
        return out if self.floats is self.product else self.floats[: hidden.shape[0]].copy_(out)

    def in_product_dtype(self, values: torch.Tensor) -> torch.Tensor:
        """``values`` (float32, in ``floats``) in the product's dtype, for the gradient products."""
        return values if self.floats is self.product else self.product[: values.shape[0]].copy_(values)


class _LinearTokenLogps(torch.autograd.Function):
    """Log-probs under ``hidden @ weight.T + bias``, one chunk of positions' logits at a time.

    The forward keeps each position's log-normaliser; the backward recomputes a chunk's logits,
    turns them in place into their gradient, ``Σ_s g_s (onehot(target_s) - softmax)``, and
    multiplies it into the gradients of the hidden states and the weights (accumulated in
    float32). Matrix products run in the autocast dtype when autocast is on (as the model's own
    head would), the softmax in float32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size):
        dtype = _compute_dtype(hidden)
        count = hidden.shape[0]
        buffers = _ChunkBuffers(min(chunk_size, count), weight, bias, dtype, hidden.device)
        logps = torch.empty(targets.shape, dtype=torch.float32, device=hidden.device)
        normalisers = torch.empty(count, dtype=torch.float32, device=hidden.device)
        for start in range(0, count, chunk_size):
            rows = slice(start, start + chunk_size)
            logits = buffers.logits(hidden[rows].to(dtype))
            picked = logits.gather(1, targets[rows])
            peak = logits.amax(dim=1, keepdim=True)
            normaliser = peak + logits.sub_(peak).exp_().sum(dim=1, keepdim=True).log_()
            logps[rows] = picked - normaliser
            normalisers[rows] = normaliser.squeeze(1)
        ctx.save_for_backward(hidden, weight, bias, targets, normalisers)
        ctx.chunk_size, ctx.dtype = chunk_size, dtype
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, normalisers = ctx.saved_tensors
        dtype, chunk_size, count = ctx.dtype, ctx.chunk_size, hidden.shape[0]
        needs_hidden, needs_weight, needs_bias = ctx.needs_input_grad[:3]
        buffers = _ChunkBuffers(min(chunk_size, count), weight, bias, dtype, hidden.device)
        grad_hidden = torch.empty(hidden.shape, dtype=dtype, device=hidden.device) if needs_hidden else None
        grad_weight = (
            torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if needs_weight else None
        )
        grad_bias = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if needs_bias else None
        grad_logps = grad_logps.float()
        for start in range(0, count, chunk_size):
            rows = slice(start, start + chunk_size)
            chunk = hidden[rows].to(dtype)
            grad = grad_logps[rows]
            # softmax, then in place the gradient of the gathered log-probs w.r.t. the logits
            grad_logits = buffers.logits(chunk).sub_(normalisers[rows, None]).exp_()
            grad_logits.mul_(-grad.sum(dim=1, keepdim=True)).scatter_add_(1, targets[rows], grad)
            if grad_bias is not None:
                grad_bias += grad_logits.sum(dim=0)
            grad_logits = buffers.in_product_dtype(grad_logits)
            if grad_hidden is not None:
                torch.mm(grad_logits, buffers.weight, out=grad_hidden[rows])
            if grad_weight is not None:
                if dtype == torch.float32:
                    grad_weight.addmm_(grad_logits.T, chunk)
                else:
                    grad_weight += (grad_logits.T @ chunk).float()
        grad_hidden = None if grad_hidden is None else grad_hidden.to(hidden.dtype)
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        grad_bias = None if grad_bias is None else grad_bias.to(bias.dtype)
        return grad_hidden, grad_weight, grad_bias, None, None
