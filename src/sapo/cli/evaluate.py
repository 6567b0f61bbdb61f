"""``sapo eval``: how good a model is, by one of two suites.

- ``--suite margins`` (the default): sapo's own measure on held-out SFT rows, gold against the
  model's own segment-spliced rewrite (margin, win rate, gold log-prob), plus exact match on the
  built-in tasks (:mod:`sapo.evaluation.margins`);
- ``--suite lm-eval``: tasks of EleutherAI's lm-evaluation-harness, the harness's own ones (the
  Open LLM Leaderboard's, ``ifeval``) or local YAML tasks (:mod:`sapo.evaluation.harness`). The
  last line printed is one JSON object, ``{"suite": "lm-eval", "results": {task: {metric: value}}}``.

Also here: the loaders every evaluating command shares (a full model, or a LoRA adapter
folder) and the held-out rows of ``sapo train --eval_dataset``.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from sapo.cli.arguments import ArgumentParser, DataArguments, EvalArguments, ModelArguments, closest

SUITES = ("margins", "lm-eval")
RESULTS_FILE = "results.json"
ADAPTER_FILE = "adapter_config.json"
# an evaluation's result replaces an earlier one at the same path (the same command recomputes it)
REPLACED = " (replacing the earlier file)"


@dataclass
class LMEvalArguments:
    r"""
    How `sapo eval --suite lm-eval` runs lm-evaluation-harness tasks.

    Parameters:
        tasks (`str`):
            Comma-separated harness task or group names (`ifeval`, `arc_challenge`, ...) or local
            tasks of `include_path`.
        include_path (`str`, *optional*):
            Folder of local task YAML files (e.g. `dataset_path: json` with `data_files`).
        limit (`int`, *optional*):
            Evaluate only the first this many documents of each task.
        num_fewshot (`int`, *optional*):
            Few-shot examples per prompt; the task's own setting when unset.
        apply_chat_template (`bool`, *optional*, defaults to `False`):
            Render each prompt with the tokenizer's chat template (chat models, IFEval).
        batch_size (`int`, *optional*, defaults to `8`):
            Requests per forward pass.
        output_dir (`str`, *optional*, defaults to `"sapo-lm-eval"`):
            Where the harness's full results are written, as `results.json`.
    """

    tasks: str = field(metadata={"help": "Comma-separated lm-eval task or group names."})
    include_path: str | None = field(default=None, metadata={"help": "Folder of local task YAML files."})
    limit: int | None = field(default=None, metadata={"help": "Documents per task (the first N)."})
    num_fewshot: int | None = field(default=None, metadata={"help": "Few-shot examples per prompt."})
    apply_chat_template: bool = field(
        default=False, metadata={"help": "Render prompts with the tokenizer's chat template."}
    )
    batch_size: int = field(default=8, metadata={"help": "Requests per forward pass."})
    output_dir: str = field(
        default="sapo-lm-eval", metadata={"help": "Folder of the harness's full results.json."}
    )

    def __post_init__(self):
        for name in ("limit", "batch_size"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value}: must be positive")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise ValueError(f"num_fewshot={self.num_fewshot}: must be >= 0")


@dataclass
class EvalDataArguments:
    r"""
    Held-out rows `sapo train` scores the policy on while it trains.

    Parameters:
        eval_dataset (`str`, *optional*):
            A name of the kinds `dataset_name` takes. At each evaluation of `eval_strategy`
            (`steps` with `eval_steps`, or `epoch`) the policy's margin, win rate and gold
            log-prob on it are logged as `eval_margin`, `eval_win_rate`, `eval_gold_logp`.
        eval_dataset_split (`str`, *optional*, defaults to `"validation"`):
            Split of `eval_dataset` to read; a single file ignores it.
    """

    eval_dataset: str | None = field(
        default=None, metadata={"help": "Held-out SFT rows evaluated at each eval_strategy step."}
    )
    eval_dataset_split: str = field(default="validation", metadata={"help": "Split of eval_dataset."})


def prepare_eval(argv: Sequence[str]) -> Callable[[], None]:
    suite, argv = _pop_suite(argv)
    return _prepare_lm_eval(argv) if suite == "lm-eval" else _prepare_margins(argv)


def _pop_suite(argv: Sequence[str]) -> tuple[str, list[str]]:
    """The ``--suite`` value (``margins`` when absent) and the other arguments."""
    rest, suite = list(argv), "margins"
    for index, item in enumerate(rest):
        if item.startswith("--suite="):
            suite = item.partition("=")[2]
            del rest[index]
            break
        if item == "--suite":
            if index + 1 == len(rest):
                raise ValueError(f"--suite needs a value: {', '.join(SUITES)}")
            suite = rest[index + 1]
            del rest[index : index + 2]
            break
    if suite not in SUITES:
        raise ValueError(f"suite: {suite!r} is not one of {', '.join(SUITES)}{closest(suite, SUITES)}")
    return suite, rest


def evaluation_tokenizer(model_args: ModelArguments):
    """The tokenizer of the model to evaluate; for a LoRA adapter folder without one, its base
    model's. Without a pad token it pads with EOS, as in training."""
    from sapo.cli.loading import load_tokenizer

    folder = Path(model_args.model_name_or_path).expanduser()
    if (folder / ADAPTER_FILE).is_file() and not (folder / "tokenizer_config.json").is_file():
        base = json.loads((folder / ADAPTER_FILE).read_text()).get("base_model_name_or_path")
        model_args = dataclasses.replace(model_args, model_name_or_path=base)
    tokenizer = load_tokenizer(model_args)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def evaluation_model(model_args: ModelArguments, tokenizer, seed: int = 0):
    """The model to evaluate, in eval mode, on the GPU when there is one. A folder holding
    ``adapter_config.json`` is a LoRA adapter, loaded onto its base with peft's
    ``AutoPeftModelForCausalLM`` (the base quantized and its code trusted as the flags say)."""
    import torch

    from sapo.cli.loading import load_model, quantization_config, quantized_device_map, root_cause_message

    folder = Path(model_args.model_name_or_path).expanduser()
    quantization = quantization_config(model_args)
    if (folder / ADAPTER_FILE).is_file():
        from peft import AutoPeftModelForCausalLM

        options = {"trust_remote_code": model_args.trust_remote_code}
        if model_args.torch_dtype is not None:
            options["dtype"] = model_args.torch_dtype
        if quantization is not None:
            options.update(quantization_config=quantization, device_map=quantized_device_map())
        try:
            model = AutoPeftModelForCausalLM.from_pretrained(str(folder), **options)
        except Exception as error:
            raise ValueError(
                f"model_name_or_path: cannot load the adapter in {folder}: {root_cause_message(error)}"
            ) from error
    else:
        model = load_model(model_args, tokenizer, seed=seed)
    if quantization is None:  # a quantized model is placed as it loads
        model = model.to("cuda" if torch.cuda.is_available() else "cpu")
    return model.eval()


def _prepare_lm_eval(argv: Sequence[str]) -> Callable[[], None]:
    from sapo.checkpoints import write_whole
    from sapo.evaluation import harness

    parser = ArgumentParser((LMEvalArguments, ModelArguments), "sapo eval --suite lm-eval")
    args, model_args = parser.parse(argv)
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise ValueError(f"output_dir: {output_dir} is a file, not a folder")
    names = harness.task_names(args.tasks)
    manager = harness.task_manager(names, args.include_path)
    tasks = harness.load_tasks(manager, names)
    tokenizer = evaluation_tokenizer(model_args)
    if args.apply_chat_template and tokenizer.chat_template is None:
        raise ValueError("apply_chat_template: the tokenizer has no chat template (set `chat_template`)")
    model = evaluation_model(model_args, tokenizer)

    def run() -> None:
        from lm_eval.utils import handle_non_serializable

        results = harness.run_tasks(
            model, tokenizer, tasks, manager, limit=args.limit, num_fewshot=args.num_fewshot,
            apply_chat_template=args.apply_chat_template, batch_size=args.batch_size,
        )  # fmt: skip
        print(harness.results_table(results))
        output_dir.mkdir(parents=True, exist_ok=True)
        path = output_dir / RESULTS_FILE
        replaced = write_whole(path, json.dumps(results, indent=2, default=handle_non_serializable) + "\n")
        print(f"wrote {path}{REPLACED if replaced else ''}")
        print(json.dumps({"suite": "lm-eval", "results": harness.task_metrics(results)}))

    return run


def load_eval_rows(eval_args: EvalDataArguments, data_args: DataArguments, tokenizer, config):
    """The tokenized rows of ``eval_dataset`` (``None`` without one); errors name ``eval_dataset``."""
    from sapo.cli.loading import load_rows

    name = eval_args.eval_dataset
    if name is None:
        return None
    if config.eval_strategy == "no":
        raise ValueError(
            "eval_dataset: set eval_strategy to steps (with eval_steps) or epoch to evaluate while training"
        )
    source = DataArguments(name, eval_args.eval_dataset_split, data_args.messages_column)
    try:
        rows = load_rows(source)
    except ValueError as error:
        message = str(error).replace("dataset_split:", "eval_dataset_split:", 1)
        raise ValueError(message.replace("dataset_name:", "eval_dataset:", 1)) from error
    return _tokenized(rows, f"eval_dataset: {name}", tokenizer, config.max_length, config.max_prompt_length)


def _tokenized(rows, naming: str, tokenizer, max_length, max_prompt_length):
    from sapo.data import prepare_dataset

    try:
        return prepare_dataset(rows, tokenizer, max_length, max_prompt_length)
    except ValueError as error:
        raise ValueError(f"{naming}: {error}") from error


def _prepare_margins(argv: Sequence[str]) -> Callable[[], None]:
    from sapo.builtin import builtin_name
    from sapo.checkpoints import write_whole
    from sapo.cli.loading import load_rows
    from sapo.cli.report import results_table
    from sapo.config import GenerationOptions
    from sapo.data import GOLD_IDS, PROMPT_IDS
    from sapo.evaluation import held_out_scores
    from sapo.policy import eos_token_ids
    from sapo.sampling.vllm import backend_for

    arguments = (EvalArguments, ModelArguments, DataArguments, GenerationOptions)
    parser = ArgumentParser(arguments, "sapo eval", dataset_split="test")
    eval_args, model_args, data_args, generation_args = parser.parse(argv)
    output = Path(eval_args.output_file)
    if not output.parent.is_dir():
        raise ValueError(f"output_file: no such folder: {output.parent}")
    tokenizer = evaluation_tokenizer(model_args)
    rows = load_rows(data_args)
    if eval_args.max_rows is not None:
        rows = rows.select(range(min(eval_args.max_rows, len(rows))))
    naming = f"dataset_name: {data_args.dataset_name}"
    rows = _tokenized(rows, naming, tokenizer, eval_args.max_length, eval_args.max_prompt_length)
    model = evaluation_model(model_args, tokenizer, seed=eval_args.seed)
    backend = backend_for(generation_args, model, eval_args.max_length, seed=eval_args.seed)
    pairs = list(zip(rows[PROMPT_IDS], rows[GOLD_IDS]))
    with_accuracy = builtin_name(data_args.dataset_name) is not None

    def run() -> None:
        results = held_out_scores(
            model,
            pairs,
            tokenizer.pad_token_id,
            eos_token_ids(model, tokenizer),
            eval_args.segment_length,
            with_accuracy=with_accuracy,
            seed=eval_args.seed,
            batch_size=eval_args.batch_size,
            progress=True,
            temperature=eval_args.temperature,
            top_p=eval_args.top_p,
            top_k=eval_args.top_k,
            backend=backend,
            version=0,  # the model's weights do not change while it is evaluated
        )
        metrics = ["gold_logp", "margin", "win_rate"] + (["accuracy"] if with_accuracy else [])
        print(results_table({model_args.model_name_or_path: results}, metrics, "model"))
        record = {
            "model": model_args.model_name_or_path,
            "dataset": data_args.dataset_name,
            "split": data_args.dataset_split,
            "rows": len(pairs),
            "segment_length": eval_args.segment_length,
            "seed": eval_args.seed,
            **results,
        }
        replaced = write_whole(output, json.dumps(record, indent=2) + "\n")
        print(f"wrote {output}{REPLACED if replaced else ''}")

    return run
