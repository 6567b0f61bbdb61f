"""What one GPU says about sapo at a realistic size, in a few minutes (``scripts/gpu_check.sh``).

On a model of about 0.5B parameters built from a config (Qwen2-0.5B's shape, random weights, a
char tokenizer under its 151,936-token output layer: no download), it trains

- SAPO-DPO with full fine-tuning, loaded in float32 and computing in bfloat16 (``bf16=True``):
  the float32 weights are the optimizer's masters, at the paper's RMSprop rate of 5e-7;
- SAPO-DPO with a LoRA adapter on a bfloat16 base (the single-GPU recipe's setup),

a few steps each, and reports for each the peak GPU memory next to ``sapo plan``'s figure for
the same setup, the DPO losses and margins, and the share of trainable weights that moved (a
bfloat16 step of 5e-7 would leave nearly all of them as they were). Then it times sapo's sampling
loop (``generation_backend="auto"``) against transformers' ``generate`` on the same prefixes.

On the GPU it trains twice more with ``generation_backend="vllm"`` (where vLLM is installed:
``pip install "sapo[vllm]"``): full fine-tuning, the EMA pushed into a bfloat16 engine after every
update; and LoRA with ``vllm_enable_sleep_mode`` (the engine sleeps between generation calls and
the merged EMA adapter is pushed again at every wake). Each run reports its generation seconds per
step beside the own loop's (``generation_seconds``) and how often the engine's greedy tokens equal
the own loop's on the EMA after training (``greedy_agreement``; bfloat16 kernels differ, so near
ties may go either way).

    bash scripts/gpu_check.sh            # one CUDA GPU; under 10 minutes on an H100-class GPU
    bash scripts/gpu_check.sh --tiny     # a tiny model on the CPU (the test suite runs this)

Without CUDA it runs the tiny mode. It prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time

SIZES = {
    # Qwen2-0.5B's shape: 494M parameters, 136M of them the tied embedding
    "0.5b": dict(
        hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
        num_key_value_heads=2, vocab_size=151936,
    ),
    "tiny": dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=512,
    ),
}  # fmt: skip
WORDS = "the a of to in and is it for with on this that from step data model token answer value".split()


def rows(count: int, prompt_chars: int, answer_chars: int, seed: int = 0) -> list[dict]:
    """Prompt/completion rows of random words, one token per character under the char tokenizer."""
    rng = random.Random(seed)

    def text(length: int) -> str:
        words = []
        while len(" ".join(words)) < length:
            words.append(rng.choice(WORDS))
        return " ".join(words)[:length]

    return [{"prompt": text(prompt_chars), "completion": text(answer_chars)} for _ in range(count)]


def build_model(size: str, dtype, device: str):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    from sapo.builtin.tiny import char_tokenizer

    tokenizer = char_tokenizer()
    special = dict(
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    config = Qwen2Config(**SIZES[size], tie_word_embeddings=True, max_position_embeddings=4096, **special)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen2ForCausalLM(config).to(dtype)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    return model, tokenizer


def train(mode: str, settings: dict, device: str) -> dict:
    """A few SAPO-DPO steps, full or LoRA (``mode``: ``full``, ``lora``, ``vllm``: full through
    the vLLM engine, ``vllm_lora_sleep``: LoRA through the engine in sleep mode); what moved, the
    memory next to the plan and the generation seconds."""
    import torch
    from datasets import Dataset
    from peft import LoraConfig
    from transformers.trainer_callback import PrinterCallback

    from sapo import SAPOConfig, SAPOTrainer
    from sapo.data import prepare_dataset
    from sapo.planning import GIB, Setup, model_shape, plan_memory
    from sapo.planning.memory import CUDA_RUNTIME

    lora, vllm = "lora" in mode, mode.startswith("vllm")
    model, tokenizer = build_model(settings["size"], torch.bfloat16 if lora else torch.float32, device)
    length = settings["prompt_chars"] + settings["answer_chars"] + 1
    data = rows(settings["rows"], settings["prompt_chars"], settings["answer_chars"])
    dataset = prepare_dataset(Dataset.from_list(data), tokenizer, length, settings["prompt_chars"])
    with tempfile.TemporaryDirectory() as output_dir:
        args = SAPOConfig(
            output_dir=output_dir, max_steps=settings["steps"], per_device_train_batch_size=settings["pairs"],
            learning_rate=1e-4 if lora else 5e-7, optim="rmsprop", lr_scheduler_type="constant", bf16=True,
            gradient_checkpointing=True, segment_length=settings["segment_length"], max_length=length,
            max_prompt_length=settings["prompt_chars"], replay_buffer_size=64, logging_steps=1,
            save_strategy="no", report_to="none", disable_tqdm=True, seed=0, use_cpu=device == "cpu",
            generation_backend="vllm" if vllm else "auto", vllm_enable_sleep_mode=mode.endswith("sleep"),
        )  # fmt: skip
        peft_config = (
            LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", lora_dropout=0.0) if lora else None
        )
        try:
            trainer = SAPOTrainer(
                model=model,
                args=args,
                train_dataset=dataset,
                processing_class=tokenizer,
                peft_config=peft_config,
            )
        except ValueError as error:  # vLLM not installed
            return {"error": str(error)}
        trainer.remove_callback(PrinterCallback)  # the one line printed is the report
        before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        started = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - started
        after = dict(trainer.model.named_parameters())
        moved = sum((after[n].detach() != before[n]).sum().item() for n in before)
        logged = trainer.state.log_history
        shape = model_shape(model.config, f"Qwen2 {settings['size']}", max_length=length)
        setup = Setup.of_run(
            args, shape, distributed="single", num_devices=1, weight_bytes=2 if lora else 4,
            lora_rank=16 if lora else None, lora_targets="all-linear" if lora else None,
            sequence_tokens=max(len(p) + len(g) for p, g in zip(dataset["prompt_ids"], dataset["gold_ids"])),
            answer_tokens=max(map(len, dataset["gold_ids"])), device="cuda" if device == "cuda" else "cpu",
        )  # fmt: skip
        plan = plan_memory(shape, setup)
        result = {
            "parameters": shape.parameters,
            "trainable_parameters": sum(p.numel() for p in before.values()),
            "steps": settings["steps"],
            "train_seconds": round(seconds, 1),
            "losses": [entry["loss"] for entry in logged if "loss" in entry],
            "margins": [entry["rewards/margins"] for entry in logged if "rewards/margins" in entry],
            "generation_seconds": [
                round(e["sapo/generation_seconds"], 3) for e in logged if "sapo/generation_seconds" in e
            ],
            "weights_moved_fraction": round(moved / sum(p.numel() for p in before.values()), 4),
            "plan_peak_gb": round(plan.peak / GIB, 3),
            "plan_peak_phase": plan.peak_phase,
        }
        # the first step's DPO loss is log 2 (the reference is the policy); training moves it
        result["loss_moved"] = abs(result["losses"][-1] - result["losses"][0]) > 1e-4
        if device == "cuda":
            result["peak_allocated_gb"] = round(torch.cuda.max_memory_allocated() / GIB, 2)
            result["peak_reserved_gb"] = round(torch.cuda.max_memory_reserved() / GIB, 2)
            result["plan_without_cuda_runtime_gb"] = round((plan.peak - CUDA_RUNTIME) / GIB, 3)
        if mode == "full":
            result["generation"] = sampling_speed(trainer, dataset, settings)
        if vllm:
            result["greedy_agreement"] = greedy_agreement(trainer, dataset, settings)
    return result


def greedy_agreement(trainer, dataset, settings: dict) -> float:
    """The fraction of rows whose greedy tokens from the vLLM engine equal the own loop's on the
    EMA (under the training autocast)."""
    from sapo.sampling import Sampler

    prefixes = list(dataset["prompt_ids"][: settings["generation_rows"]])
    limits = [settings["new_tokens"]] * len(prefixes)
    pad = trainer.processing_class.pad_token_id
    answers = []
    with trainer.ema.sampling_model() as model, trainer.accelerator.autocast():
        for backend in (trainer.sampler.backend, "auto"):
            greedy = Sampler.greedy(pad, trainer.eos_token_ids, backend=backend)
            answers.append(greedy.generate(model, prefixes, limits, version=trainer.ema.num_updates))
    return sum(a == b for a, b in zip(*answers)) / len(prefixes)


def sampling_speed(trainer, dataset, settings: dict) -> dict:
    """Tokens per second of sapo's sampling loop and of ``generate`` on the EMA, same prefixes."""
    import torch

    from sapo.sampling import Sampler

    prefixes = list(dataset["prompt_ids"][: settings["generation_rows"]])
    limits = [settings["new_tokens"]] * len(prefixes)
    speeds = {}
    with trainer.ema.sampling_model() as model, trainer.accelerator.autocast():
        for backend in ("auto", "transformers", "auto", "transformers"):  # the first two warm up
            pad = trainer.processing_class.pad_token_id
            sampler = Sampler(pad_token_id=pad, eos_token_ids=trainer.eos_token_ids, seed=0, backend=backend)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            started = time.perf_counter()
            segments = sampler.generate(model, prefixes, limits)
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            speeds[backend] = sum(map(len, segments)) / (time.perf_counter() - started)
    return {
        "rows": len(prefixes),
        "new_tokens": settings["new_tokens"],
        "sapo_tokens_per_s": round(speeds["auto"], 1),
        "generate_tokens_per_s": round(speeds["transformers"], 1),
        "speedup": round(speeds["auto"] / speeds["transformers"], 3),
    }


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tiny", action="store_true", help="a tiny model on the CPU (automatic without CUDA)"
    )
    parser.add_argument("--steps", type=int, help="optimizer steps per setup (default 5; 2 with --tiny)")
    options = parser.parse_args(argv)
    import torch

    if not torch.cuda.is_available():  # DeepSpeed, imported by accelerate, would say so on stdout
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import transformers

    transformers.logging.set_verbosity_error()
    tiny = options.tiny or not torch.cuda.is_available()
    device = "cpu" if tiny else "cuda"
    settings = dict(
        size="tiny" if tiny else "0.5b",
        steps=options.steps or (2 if tiny else 5),
        pairs=4 if tiny else 8,
        rows=64,
        prompt_chars=16 if tiny else 256,
        answer_chars=16 if tiny else 255,
        segment_length=8 if tiny else 128,
        generation_rows=4 if tiny else 16,
        new_tokens=8 if tiny else 128,
    )
    started = time.perf_counter()
    report = {
        "device": torch.cuda.get_device_name() if not tiny else "cpu",
        "tiny": tiny,
        "settings": settings,
    }
    # vLLM's CPU attention refuses the tiny model's head size: the engine runs on the GPU only
    for mode in ("full", "lora") + (() if tiny else ("vllm", "vllm_lora_sleep")):
        print(f"training SAPO-DPO ({mode}) ...", file=sys.stderr, flush=True)
        report[mode] = train(mode, settings, device)
        if device == "cuda":
            torch.cuda.empty_cache()
    report["generation_seconds"] = {  # per generation step, mean over the run: vLLM beside the own loop
        mode: round(sum(run["generation_seconds"]) / len(run["generation_seconds"]), 3)
        for mode, run in report.items()
        if isinstance(run, dict) and run.get("generation_seconds")
    }
    report["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(report))


if __name__ == "__main__":
    main()
