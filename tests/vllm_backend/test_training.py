"""SAPO with `generation_backend="vllm"`: a resumed run ends bit-identical to an uninterrupted
one, with real negatives; a LoRA EMA reaches the engine merged into the base, the policy adapter
untouched."""

import json

import torch
from conftest import addition_rows
from datasets import Dataset
from peft import LoraConfig
from safetensors.torch import load_file
from vllm_required import needs_vllm

from sapo import SAPOConfig, SAPOTrainer
from sapo.builtin.tiny import tiny_llama
from sapo.cli import main
from sapo.copies.lora import EMA_ADAPTER, adapter_parameters
from sapo.sampling import Sampler

pytestmark = needs_vllm

SMALL_RUN = [
    "--model_name_or_path", "builtin:small", "--dataset_name", "DATA", "--generation_backend", "vllm",
    "--max_steps", "6", "--save_strategy", "steps", "--save_steps", "3", "--logging_steps", "1",
    "--per_device_train_batch_size", "4", "--segment_length", "4", "--max_length", "48",
    "--learning_rate", "1e-3", "--report_to", "none", "--disable_tqdm", "true",
]  # fmt: skip


def test_a_vllm_run_resumes_bit_identically_from_checkpoint_3(tmp_path):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in addition_rows(32, seed=1)))
    run = [str(data) if flag == "DATA" else flag for flag in SMALL_RUN] + [
        "--output_dir",
        str(tmp_path / "run"),
    ]
    assert main(["train", *run]) == 0
    uninterrupted = load_file(tmp_path / "run" / "model.safetensors")
    history = json.loads((tmp_path / "run" / "trainer_state.json").read_text())["log_history"]
    tied = [entry["sapo/tied_fraction"] for entry in history if "sapo/tied_fraction" in entry]
    assert len(tied) == 6 and sum(tied) / len(tied) < 1  # the engine's segments are real negatives

    resume = ["--resume_from_checkpoint", str(tmp_path / "run" / "checkpoint-3")]
    assert main(["train", *run, *resume]) == 0
    resumed = load_file(tmp_path / "run" / "model.safetensors")
    assert uninterrupted.keys() == resumed.keys()
    for name, tensor in uninterrupted.items():
        assert torch.equal(tensor, resumed[name]), name


def test_a_lora_ema_is_pushed_merged_and_the_policy_adapter_is_untouched(tmp_path, tokenizer):
    # init_lora_weights=False: B starts random, so the adapters change the model from step 0
    lora = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], init_lora_weights=False
    )
    args = SAPOConfig(
        output_dir=str(tmp_path / "out"), max_steps=2, per_device_train_batch_size=4, segment_length=4,
        learning_rate=1e-2, save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        generation_backend="vllm",
    )  # fmt: skip
    trainer = SAPOTrainer(
        model=tiny_llama(tokenizer, "small", seed=0, tie_word_embeddings=False),
        args=args,
        train_dataset=Dataset.from_list(addition_rows(16, seed=2)),
        processing_class=tokenizer,
        peft_config=lora,
    )
    trainer.train()
    model = trainer.model
    rows, limits = [[8, 9, 10], [20, 21, 22, 23, 24], [40]], [10, 10, 10]
    before = {name: param.detach().clone() for name, param in model.named_parameters()}
    vllm = Sampler.greedy(tokenizer.pad_token_id, [2], backend=trainer.sampler.backend)
    own = Sampler.greedy(tokenizer.pad_token_id, [2])
    with trainer.ema.sampling_model(whole=False) as sampling:
        assert sampling.active_adapter == EMA_ADAPTER
        pushed = vllm.generate(sampling, rows, limits, version=1000)
        assert sampling.active_adapter == EMA_ADAPTER
        expected = own.generate(sampling, rows, limits)
        with sampling.disable_adapter():
            base_only = own.generate(sampling, rows, limits)
    assert pushed == expected
    assert base_only != expected  # the merged adapter is what made the difference
    assert all(torch.equal(before[name], param) for name, param in model.named_parameters())
    assert adapter_parameters(model, "default").keys() and model.active_adapter == "default"
