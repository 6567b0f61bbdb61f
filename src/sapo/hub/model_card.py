"""The model card (``README.md``) of a trained model, written from the run's own state.

A model pushed to the Hub should say how it was trained. The card is a ``huggingface_hub``
:class:`~huggingface_hub.ModelCard`: YAML metadata (``base_model`` when it is a Hub id,
``library_name`` ``transformers`` or ``peft`` for an adapter, ``tags`` with ``sapo`` and the loss,
``datasets`` when they are Hub ids), then the method in one sentence, every setting the method's
config adds to ``TrainingArguments`` (read from the config's fields, so a new field shows up
without touching this module) with the values in force, the training settings that set the
update, the last logged value of every metric, the framework versions and the paper's BibTeX.

Everything comes from a ``transformers.Trainer`` after (or during) training: its ``args``,
``state.log_history`` and model. The trainer writes the card; this module knows nothing of it.
"""

from __future__ import annotations

import dataclasses
import enum
import importlib.metadata
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from huggingface_hub import ModelCard, ModelCardData
from transformers import TrainingArguments

from sapo.policy import is_peft_model

CARD_FILE = "README.md"
FRAMEWORKS = ("sapo", "transformers", "torch", "trl", "peft", "datasets", "accelerate")
# the TrainingArguments fields that shape the update itself (the rest are logistics)
TRAINING_FIELDS = (
    "learning_rate",
    "lr_scheduler_type",
    "warmup_ratio",  # not a field of every transformers version
    "warmup_steps",
    "weight_decay",
    "optim",
    "max_grad_norm",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "max_steps",
    "num_train_epochs",
    "seed",
    "bf16",
    "fp16",
    "gradient_checkpointing",
)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")  # "org/name" or "name"; not "builtin:x", not paths

SAPO_CITATION = """@misc{yin2024sapo,
  title         = {Self-Augmented Preference Optimization: Off-Policy Paradigms for Language Model Alignment},
  author        = {Yin, Yueqin and Wang, Zhendong and Xie, Yujia and Chen, Weizhu and Zhou, Mingyuan},
  year          = {2024},
  eprint        = {2405.20830},
  archivePrefix = {arXiv},
  primaryClass  = {cs.CL},
  url           = {https://arxiv.org/abs/2405.20830}
}"""
SPIN_CITATION = """@misc{chen2024spin,
  title         = {Self-Play Fine-Tuning Converts Weak Language Models to Strong Language Models},
  author        = {Chen, Zixiang and Deng, Yihe and Yuan, Huizhuo and Ji, Kaixuan and Gu, Quanquan},
  year          = {2024},
  eprint        = {2401.01335},
  archivePrefix = {arXiv},
  primaryClass  = {cs.LG},
  url           = {https://arxiv.org/abs/2401.01335}
}"""


@dataclass(frozen=True)
class Method:
    """How a card names and cites the method that trained the model.

    ``summary`` is one sentence; ``{loss}`` in it becomes the config's loss (``DPO``, ``ORPO``).
    ``citations`` are BibTeX entries, the method's paper first.
    """

    name: str
    title: str
    tag: str
    summary: str
    citations: tuple[str, ...]


SAPO = Method(
    name="SAPO",
    title="Self-Augmented Preference Optimization (arXiv 2405.20830)",
    tag="sapo",
    summary=(
        "SAPO learns preferences from SFT data alone: an exponential moving average (EMA) of the policy "
        "rewrites a segment of each gold answer, the rewrite is the rejected answer, and the pairs go "
        "through a replay buffer into the {loss} loss."
    ),
    citations=(SAPO_CITATION,),
)
SPIN = Method(
    name="SPIN",
    title="Self-Play fINe-tuning (arXiv 2401.01335), the iterative baseline of SAPO (arXiv 2405.20830)",
    tag="spin",
    summary=(
        "SPIN trains, each iteration, with {loss} on the gold answers against the model's own answers "
        "to the same prompts, the reference being the model as it was when the iteration began."
    ),
    citations=(SPIN_CITATION, SAPO_CITATION),
)


def method_settings(args: TrainingArguments) -> dict[str, Any]:
    """The fields ``args``' class adds to ``TrainingArguments`` (SAPO's, SPIN's), in declaration order."""
    inherited = {field.name for field in dataclasses.fields(TrainingArguments)}
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(args) if f.name not in inherited}


def final_metrics(log_history: Iterable[Mapping[str, Any]]) -> dict[str, tuple[Any, int | None]]:
    """Every logged metric's last value, with the step it was logged at, in first-logged order."""
    last: dict[str, tuple[Any, int | None]] = {}
    for entry in log_history:
        for name, value in entry.items():
            if name != "step":
                last[name] = (value, entry.get("step"))
    return last


def framework_versions(names: Iterable[str] = FRAMEWORKS) -> dict[str, str]:
    """Installed versions of ``names`` (those not installed are left out)."""
    versions = {}
    for name in names:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def hub_ids(names: Iterable[str | None]) -> list[str]:
    """The names that can be Hub repository ids (not local paths, not ``builtin:`` names)."""
    return [name for name in names if name and HUB_ID.match(name) and not os.path.exists(name)]


def _setting(value: Any) -> str:
    """A setting exactly (``3e-05``, not ``0.000``; an enum by its value), as inline code."""
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{value!r}`" if isinstance(value, float) else f"`{value}`"


def _metric(value: Any) -> str:
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def _table(header: tuple[str, ...], rows: Iterable[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def build_model_card(
    trainer,
    method: Method = SAPO,
    settings_in_force: Mapping[str, Any] | None = None,
    dataset_name: str | Iterable[str] | None = None,
    base_model: str | None = None,
    model_name: str | None = None,
    tags: str | Iterable[str] | None = None,
    note: str | None = None,
    **card_data: Any,
) -> ModelCard:
    """The card of the model ``trainer`` trains (a ``transformers.Trainer``), from its state now.

    Args:
        settings_in_force: values that replace the config's where the run resolved them (e.g.
            ``ref_model_sync_steps`` left unset and set to one epoch's steps).
        dataset_name: the training data's name(s); Hub ids also go into the metadata.
        base_model: the name the model was loaded by, when its config does not record it (a
            ``builtin:`` model); defaults to the config's ``_name_or_path``.
        model_name: the card's title; defaults to the Hub repository's or the output folder's name.
        tags: added to ``sapo``, the method's tag and the loss.
        note: a sentence placed after the method's (e.g. which SPIN iteration this is).
        card_data: further ``ModelCardData`` fields (``license``, ``language``, ...).
    """
    args = trainer.args
    model = trainer.accelerator.unwrap_model(trainer.model)
    adapter = is_peft_model(model)
    base_model = base_model or getattr(model.config, "_name_or_path", "") or None
    datasets = [dataset_name] if isinstance(dataset_name, str) else list(dataset_name or [])
    tags = [tags] if isinstance(tags, str) else list(tags or [])
    settings = method_settings(args)
    loss = str(settings.get("loss_type", "dpo"))
    in_force = dict(settings_in_force or {})
    model_name = model_name or (trainer.hub_model_id or Path(args.output_dir).name).split("/")[-1]

    metadata = ModelCardData(
        base_model=(hub_ids([base_model]) or [None])[0],
        datasets=hub_ids(datasets) or None,
        library_name="peft" if adapter else "transformers",
        model_name=model_name,
        tags=list(dict.fromkeys(["sapo", method.tag, loss, *tags, "generated_from_trainer"])),
        **card_data,
    )
    origin = f"`{base_model}`" if base_model else "a model built in Python (no name recorded)"
    trained_on = f" on {', '.join(f'`{name}`' for name in datasets)}" if datasets else ""
    kind = "A LoRA adapter" if adapter else "A model"
    setting_rows = []
    for name, value in settings.items():
        shown = _setting(in_force.get(name, value))
        if name in in_force and in_force[name] != value:
            shown += f" (in force; the config had {_setting(value)})"
        setting_rows.append((f"`{name}`", shown))
    present = [name for name in TRAINING_FIELDS if hasattr(args, name)]  # fields differ across versions
    training_rows = [(f"`{name}`", _setting(getattr(args, name))) for name in present]
    metrics = final_metrics(trainer.state.log_history)
    metric_rows = [(f"`{name}`", _metric(value), str(step)) for name, (value, step) in metrics.items()]
    versions = framework_versions()
    loader = "peft.AutoPeftModelForCausalLM" if adapter else "transformers.AutoModelForCausalLM"

    body = f"""
# {model_name}

{kind} trained from {origin}{trained_on} with {method.name}, {method.title},
for {trainer.state.global_step} optimizer steps by the `sapo` library.

{method.summary.format(loss=loss.upper())}{f" {note}" if note else ""}

Load it with `{loader}.from_pretrained` on this folder or repository.

## {method.name} settings

{_table(("setting", "value"), setting_rows)}

## Training settings

{_table(("setting", "value"), training_rows)}

## Final logged metrics

{_table(("metric", "value", "step"), metric_rows) if metric_rows else "Nothing was logged."}

## Framework versions

{chr(10).join(f"- {name}: {version}" for name, version in versions.items())}

## Citation

{chr(10).join(f"```bibtex{chr(10)}{citation}{chr(10)}```" for citation in method.citations)}
"""
    return ModelCard(f"---\n{metadata.to_yaml()}\n---\n{body}")


def write_model_card(directory: str | os.PathLike, trainer, **kwargs: Any) -> Path:
    """Write :func:`build_model_card`'s card as ``directory/README.md`` (replacing any there)."""
    path = Path(directory) / CARD_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    build_model_card(trainer, **kwargs).save(path)
    return path
