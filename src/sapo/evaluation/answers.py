"""The model's own answers to chat prompts, for judges that read answers (AlpacaEval, MT-Bench).

A conversation is rendered with the tokenizer's chat template, generation prompt added; answers
are sampled in batches by :class:`sapo.sampling.Sampler` (left padding, KV cache) and
end where training ends an answer, at any of ``sapo.policy.eos_token_ids``. A temperature of 0
decodes greedily.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from tqdm.auto import tqdm

from sapo.policy import eos_token_ids
from sapo.sampling import Sampler, evaluating

Conversation = Sequence[dict[str, str]]


def chat_prompt_ids(tokenizer, conversation: Conversation) -> list[int]:
    """Token ids of ``conversation`` followed by the template's assistant header."""
    if tokenizer.chat_template is None:
        raise ValueError("the tokenizer has no chat template (set `chat_template`)")
    text = tokenizer.apply_chat_template(list(conversation), tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def answer_conversations(
    model: torch.nn.Module,
    tokenizer,
    conversations: Sequence[Conversation],
    temperatures: Sequence[float],
    max_new_tokens: int,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    progress: bool = False,
    backend="auto",
    version: int | None = None,
) -> list[str]:
    """The next assistant turn of every conversation, in order.

    ``temperatures[i]`` samples conversation ``i`` (0: greedy); conversations that share a
    temperature are batched together, longest prompts first. An answer has at most
    ``max_new_tokens`` tokens and never runs past the model's ``max_position_embeddings``.
    ``backend`` samples (a name or a :class:`~sapo.sampling.SamplingBackend`); ``version`` names
    ``model``'s weights (``None``: unknown, an engine that copies them refreshes its copy at
    every batch).
    """
    if len(conversations) != len(temperatures):
        raise ValueError("conversations and temperatures differ in length")
    prompts = [chat_prompt_ids(tokenizer, conversation) for conversation in conversations]
    context = getattr(model.config, "max_position_embeddings", None) or 10**9
    limits = [max(0, min(max_new_tokens, context - len(prompt))) for prompt in prompts]
    answers = [""] * len(prompts)
    eos = eos_token_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos[0]
    with evaluating(model):
        for temperature in sorted(set(temperatures)):
            rows = [i for i, t in enumerate(temperatures) if t == temperature and limits[i] > 0]
            rows.sort(key=lambda i: -len(prompts[i]))
            sampler = _sampler(pad, eos, temperature, top_p, seed, backend)
            starts = range(0, len(rows), batch_size)
            for start in tqdm(starts, desc=f"Answers (temperature {temperature})", disable=not progress):
                batch = rows[start : start + batch_size]
                prefixes, batch_limits = [prompts[i] for i in batch], [limits[i] for i in batch]
                tokens = sampler.generate(model, prefixes, batch_limits, version=version)
                for i, ids in zip(batch, tokens):
                    answers[i] = tokenizer.decode(ids, skip_special_tokens=True).strip()
    return answers


def _sampler(pad_token_id: int, eos: list[int], temperature: float, top_p: float, seed: int, backend):
    if temperature == 0:
        return Sampler.greedy(pad_token_id, eos, seed=seed, backend=backend)
    return Sampler(
        pad_token_id, eos, temperature=temperature, top_p=top_p, top_k=0, seed=seed, backend=backend
    )
