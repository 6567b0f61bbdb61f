"""The model card each trained folder holds, read back from real runs' folders with huggingface_hub."""

import importlib.metadata
import json

import pytest
from huggingface_hub import ModelCard
from peft import LoraConfig

from sapo import SAPOConfig, SAPOTrainer
from sapo.builtin.tasks import task_dataset
from sapo.checkpoints.verify import inspect
from sapo.cli import main
from sapo.hub.model_card import FRAMEWORKS, hub_ids

ROWS = [row for row in task_dataset("addition", "validation").select(range(16))]
TINY = ["--model_name_or_path", "builtin:tiny", "--max_length", "32", "--max_prompt_length", "24",
        "--per_device_train_batch_size", "4", "--report_to", "none", "--logging_steps", "1"]  # fmt: skip


@pytest.fixture
def rows_file(tmp_path):
    path = tmp_path / "addition.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    return str(path)


def load_card(folder) -> ModelCard:
    return ModelCard.load(folder / "README.md")  # a file path: read locally, never from the Hub


def test_sapo_train_writes_a_card_that_names_the_run(tmp_path, rows_file):
    output = tmp_path / "out"
    argv = ["train", *TINY, "--dataset_name", rows_file, "--max_steps", "4", "--segment_length", "2",
            "--replay_buffer_size", "8", "--save_strategy", "steps", "--save_steps", "2",
            "--output_dir", str(output)]  # fmt: skip
    assert main(argv) == 0
    card = load_card(output)
    assert card.data.library_name == "transformers"
    assert {"sapo", "dpo"} <= set(card.data.tags)
    assert card.data.base_model is None and card.data.datasets is None  # neither is a Hub id
    text = card.text
    assert "with SAPO, Self-Augmented Preference Optimization" in text
    assert "trained from `builtin:tiny` on `" + rows_file + "`" in text
    assert "for 4 optimizer steps" in text
    assert "| `segment_length` | `2` |" in text and "| `replay_buffer_size` | `8` |" in text
    assert "| `loss_type` | `dpo` |" in text and "| `learning_rate` | `5e-05` |" in text
    # left unset, the reference sync interval in force is one epoch: 16 rows / 4 per step
    assert "| `ref_model_sync_steps` | `4` (in force; the config had `None`) |" in text
    logged = json.loads((output / "checkpoint-4" / "trainer_state.json").read_text())["log_history"]
    margins = [entry["rewards/margins"] for entry in logged if "rewards/margins" in entry]
    assert len(margins) == 4 and f"| `rewards/margins` | {margins[-1]:.6g} | 4 |" in text
    for name in FRAMEWORKS:
        assert f"- {name}: {importlib.metadata.version(name)}" in text
    assert "@misc{yin2024sapo" in text and "eprint        = {2405.20830}" in text
    # a checkpoint carries its card and still verifies: the card was written before the seal
    for step in (2, 4):
        assert "for " + str(step) + " optimizer steps" in load_card(output / f"checkpoint-{step}").text
        verdict = inspect(output / f"checkpoint-{step}")
        assert verdict.problem is None and verdict.verified


def test_save_model_writes_the_card_of_an_adapter(tmp_path, tokenizer, tiny_model, addition_dataset):
    tiny_model.config._name_or_path = "HuggingFaceTB/SmolLM2-135M"  # as from_pretrained records it
    args = SAPOConfig(
        output_dir=str(tmp_path / "out"), loss_type="orpo", beta=0.25, segment_length=3, max_steps=2,
        per_device_train_batch_size=4, logging_steps=1, report_to="none", use_cpu=True, disable_tqdm=True,
    )  # fmt: skip
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0)
    trainer = SAPOTrainer(tiny_model, args, addition_dataset, processing_class=tokenizer, peft_config=lora)
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    card = load_card(tmp_path / "final")
    assert card.data.library_name == "peft"
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M"
    assert {"sapo", "orpo"} <= set(card.data.tags) and "dpo" not in card.data.tags
    assert "A LoRA adapter trained from `HuggingFaceTB/SmolLM2-135M`" in card.text
    assert "into the ORPO loss" in card.text
    assert "| `beta` | `0.25` |" in card.text and "| `segment_length` | `3` |" in card.text
    assert "| `ref_model_sync_steps` | `None` |" in card.text  # ORPO has no reference to sync
    # what push_to_hub calls: the card in output_dir, naming the data
    trainer.create_model_card(dataset_name="HuggingFaceH4/ultrachat_200k", license="apache-2.0")
    pushed = load_card(tmp_path / "out")
    assert pushed.data.datasets == ["HuggingFaceH4/ultrachat_200k"] and pushed.data.license == "apache-2.0"


def test_sapo_spin_writes_a_card_per_iteration(tmp_path, rows_file):
    output = tmp_path / "spin"
    argv = ["spin", *TINY, "--dataset_name", rows_file, "--max_steps", "2", "--spin_iterations", "1",
            "--max_new_tokens", "4", "--output_dir", str(output)]  # fmt: skip
    assert main(argv) == 0
    card = load_card(output / "iteration-1")
    assert {"sapo", "spin", "dpo"} <= set(card.data.tags)
    assert "trained from `builtin:tiny`" in card.text and "with SPIN" in card.text
    assert "This is iteration 1 of 1." in card.text
    assert "| `spin_iterations` | `1` |" in card.text and "| `max_new_tokens` | `4` |" in card.text
    assert "eprint        = {2401.01335}" in card.text and "eprint        = {2405.20830}" in card.text


def test_only_hub_ids_go_into_the_metadata(tmp_path):
    (tmp_path / "model").mkdir()
    (tmp_path / "rows.jsonl").write_text("")
    local = [str(tmp_path / "model"), str(tmp_path / "rows.jsonl")]
    names = ["org/model", "gpt2", "builtin:tiny", *local, None, "", "a/b/c", "./model"]
    assert hub_ids(names) == ["org/model", "gpt2"]
