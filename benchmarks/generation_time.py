"""Time SAPO's segment generation alone, with the options transformers offers, on the benchmark's model.

One call samples up to ``--segment_length`` tokens for each of ``--batch_size`` rows after
``prompt + gold[:cut]`` prefixes drawn as in ``step_time.py`` (prompt 64, cut uniform in [0, 32]),
through ``Sampler.generate`` with a stop id the model never samples, so every call runs to
the full length. Variants, interleaved over ``--repeats`` calls each, median wall-clock:

- ``sample``: what the trainer does, SAPO's sampling loop (``sapo.sampling.own_loop``: dynamic KV cache,
  masks prepared once, transformers' temperature/top-k/top-p warpers);
- ``generate``: transformers' ``generate`` with the same settings (``backend="transformers"``);
- ``static_cache``: ``generate`` with ``cache_implementation="static"`` (through
  ``GenerateWithOptions``, a sampling backend of this benchmark's own);
- ``greedy``: SAPO's loop with top-k 1 (what sampling costs over the argmax);
- ``one_thread``: ``Sampler(num_threads=1)``;
- ``static_compiled`` (``--compile``): ``generate`` with a static cache and ``torch.compile`` of the
  forward (transformers does this by itself on GPUs; on CPU it has to be asked for). Its first
  call, the compilation, is reported on its own.

The two backends draw the same tokens for the same seed (``tests/test_decoding.py``).

    python -m benchmarks.generation_time --threads 1
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import statistics
import sys
import time
import warnings

if not __package__:  # started as a file: run as the module (benchmarks/__init__.py)
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.generation_time", *sys.argv[1:]])

import torch
import transformers
from transformers import CompileConfig

from benchmarks import harness
from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.sampling import Sampler
from sapo.sampling.backends import generation_config, left_padded


def prefixes(tokenizer, count: int, prompt_length: int, max_cut: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)
    ordinary = range(6, len(tokenizer))  # no special token: never EOS or padding
    return [
        [rng.choice(ordinary) for _ in range(prompt_length + rng.randint(0, max_cut))] for _ in range(count)
    ]


class GenerateWithOptions:
    """transformers' ``generate`` with ``options`` set on its ``GenerationConfig``: a
    ``SamplingBackend`` (the sampler takes any), so that the benchmark passes the options in
    rather than replacing a method. Every row of the benchmark runs to the same limit, so it
    needs no per-row stopping criterion."""

    name = "transformers"

    def __init__(self, **options):
        self.options = options

    def sample(self, model, prefixes, limits, settings, version=None):
        device = next(model.parameters()).device
        input_ids, attention_mask = left_padded(prefixes, settings.pad_token_id, device)
        config = generation_config(settings, int(max(limits)))
        for name, value in self.options.items():
            setattr(config, name, value)
        output = model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        return output[:, input_ids.shape[1] :].tolist()


def variants(tokenizer, compile_forward: bool) -> dict[str, Sampler]:
    # a stop id the model never samples (a role marker), so that every call runs to full length
    never = tokenizer.convert_tokens_to_ids("<|system|>")
    base = Sampler(pad_token_id=tokenizer.pad_token_id, eos_token_ids=[never])
    generate = dataclasses.replace(base, backend="transformers")
    found = {
        "sample": base,
        "generate": generate,
        "static_cache": dataclasses.replace(base, backend=GenerateWithOptions(cache_implementation="static")),
        "greedy": dataclasses.replace(base, temperature=1.0, top_k=1, top_p=1.0),
        "one_thread": dataclasses.replace(base, num_threads=1),
    }
    if compile_forward:
        config = CompileConfig(fullgraph=False, dynamic=False, mode="default")
        config._compile_all_devices = True  # transformers compiles by itself on GPUs only
        static_compiled = GenerateWithOptions(cache_implementation="static", compile_config=config)
        found["static_compiled"] = dataclasses.replace(base, backend=static_compiled)
    return found


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_size", type=int, default=8)
    parser.add_argument("--prompt_length", type=int, default=64)
    parser.add_argument("--segment_length", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's choice)")
    parser.add_argument("--compile", action="store_true", help="add the compiled static-cache variant")
    settings = parser.parse_args()
    load_before = harness.load_average()
    if settings.threads:
        torch.set_num_threads(settings.threads)
    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    tokenizer = char_tokenizer()
    model = tiny_llama(
        tokenizer, seed=0, hidden_size=256, intermediate_size=1024, num_hidden_layers=4, num_attention_heads=4
    ).eval()
    rows = prefixes(tokenizer, settings.batch_size, settings.prompt_length, settings.segment_length)
    limits = [settings.segment_length] * len(rows)
    generators = variants(tokenizer, settings.compile)
    first_call = {}
    for name, generator in generators.items():  # warm-up; for the compiled variant, compilation
        started = time.perf_counter()
        generator.generate(model, rows, limits)
        first_call[name] = time.perf_counter() - started
    seconds = {name: [] for name in generators}
    for _ in range(settings.repeats):
        for name, generator in generators.items():
            started = time.perf_counter()
            generator.generate(model, rows, limits)
            seconds[name].append(time.perf_counter() - started)
    medians = {name: 1000 * statistics.median(values) for name, values in seconds.items()}
    tokens = settings.batch_size * settings.segment_length
    measured_on = harness.machine(load_before)
    print(f"{settings.batch_size} rows x {settings.segment_length} new tokens")
    print(harness.describe(measured_on))
    print(f"{'variant':<16}{'call ms':>10}{'vs sample':>11}{'tokens/s':>10}{'first call ms':>15}")
    for name, value in medians.items():
        print(
            f"{name:<16}{value:>10.1f}{value / medians['sample']:>11.3f}"
            f"{tokens / value * 1000:>10.0f}{1000 * first_call[name]:>15.0f}"
        )
    summary = {
        "median_call_ms": {name: round(value, 1) for name, value in medians.items()},
        "vs_sample": {name: round(value / medians["sample"], 3) for name, value in medians.items()},
        "first_call_ms": {name: round(1000 * value) for name, value in first_call.items()},
        "machine": measured_on,
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
