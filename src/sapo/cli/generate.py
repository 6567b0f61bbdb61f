"""``sapo generate``: a model's answers, in the files the AlpacaEval, MT-Bench and Arena-Hard judges read.

- ``--suite alpaca-eval``: ``--prompts`` is a JSON list of objects with an ``instruction`` (other
  keys are kept); ``--output`` is the JSON list ``alpaca_eval --model_outputs`` takes, each object
  with ``instruction``, ``output`` and ``generator``. Defaults: greedy, up to 2048 new tokens.
- ``--suite mt-bench``: ``--prompts`` is FastChat's ``question.jsonl`` (``question_id``,
  ``category``, ``turns``); ``--output`` is FastChat's answer jsonl, one line per question with
  ``question_id``, ``answer_id``, ``model_id``, ``choices: [{"index": 0, "turns": [...]}]`` and
  ``tstamp``. Each turn is answered with the earlier turns and answers in the conversation.
  Defaults as FastChat's ``gen_model_answer.py``: its temperature per category (0 for math,
  coding, reasoning and extraction, 0.1 for STEM and humanities, 0.7 for writing, roleplay and
  anything else) and up to 1024 new tokens.
- ``--suite arena-hard``: ``--prompts`` is Arena-Hard-Auto's ``question.jsonl``, version 0.1
  (``question_id``, ``category``, ``cluster``, ``turns: [{"content"}]``) or 2.0 (``uid``,
  ``prompt``, ...); ``--output`` is its answer file in the version read, with the metadata its
  style control reads (:mod:`sapo.evaluation.arena_hard`). Defaults as arena-hard-auto's: greedy,
  up to 4096 new tokens for v0.1 and 8196 for v2.0.

Answers use the tokenizer's chat template and end where training ends an answer
(:mod:`sapo.evaluation.answers`). Files are read as ``.jsonl`` (one object per line) or as one
JSON list, by their suffix.
"""

from __future__ import annotations

import json
import random
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from sapo.cli.arguments import ArgumentParser, ModelArguments
from sapo.evaluation import arena_hard

# FastChat's gen_model_answer.py: sampling temperature per MT-Bench category, 0.7 for any other
MT_BENCH_TEMPERATURES = {
    "writing": 0.7,
    "roleplay": 0.7,
    "extraction": 0.0,
    "math": 0.0,
    "coding": 0.0,
    "reasoning": 0.0,
    "stem": 0.1,
    "humanities": 0.1,
}
MT_BENCH_DEFAULT_TEMPERATURE = 0.7
MAX_NEW_TOKENS = {"alpaca-eval": 2048, "mt-bench": 1024}
# shortuuid's alphabet: FastChat's and arena-hard-auto's answer ids are shortuuid.uuid()
ID_ALPHABET = "23456789ABCDEFGHJKLMNPQRSTUVWXYZabcdefghijkmnopqrstuvwxyz"


@dataclass
class GenerateArguments:
    r"""
    What `sapo generate` answers and how.

    Parameters:
        suite (`str`):
            `alpaca-eval`, `mt-bench` or `arena-hard`: the judge whose files are read and written.
        prompts (`str`):
            The questions: AlpacaEval's JSON list of `instruction`s, MT-Bench's `question.jsonl`,
            or Arena-Hard-Auto's `question.jsonl` (v0.1 or v2.0).
        output (`str`):
            Where the answers are written, in the judge's format.
        generator (`str`, *optional*):
            The model's name in the output (`generator`, `model_id`); defaults to the last part of
            `model_name_or_path`.
        max_new_tokens (`int`, *optional*):
            Longest answer per turn; unset: 2048 for alpaca-eval, 1024 for mt-bench, 4096 for
            arena-hard v0.1 and 8196 for v2.0.
        temperature (`float`, *optional*):
            Sampling temperature of every answer, 0 for greedy; unset: greedy for alpaca-eval and
            arena-hard, FastChat's per-category temperatures for mt-bench.
        top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling threshold when sampling.
        batch_size (`int`, *optional*, defaults to `16`):
            Prompts per generation call.
        seed (`int`, *optional*, defaults to `0`):
            Seed of sampling and of the MT-Bench answer ids.
        max_prompts (`int`, *optional*):
            Answer only the first this many prompts.
    """

    suite: Literal["alpaca-eval", "mt-bench", "arena-hard"] = field(
        metadata={"help": "alpaca-eval, mt-bench or arena-hard."}
    )
    prompts: str = field(
        metadata={"help": "AlpacaEval JSON list, or MT-Bench or Arena-Hard (v0.1, v2.0) question.jsonl."}
    )
    output: str = field(metadata={"help": "Answers file, in the judge's format."})
    generator: str | None = field(default=None, metadata={"help": "Model name in the output."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Longest answer per turn."})
    temperature: float | None = field(
        default=None, metadata={"help": "Sampling temperature, 0 for greedy; unset: the judge's default."}
    )
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    batch_size: int = field(default=16, metadata={"help": "Prompts per generation call."})
    seed: int = field(default=0, metadata={"help": "Seed of sampling and of answer ids."})
    max_prompts: int | None = field(default=None, metadata={"help": "Answer only the first N prompts."})

    def __post_init__(self):
        for name in ("max_new_tokens", "batch_size", "max_prompts"):
            value = getattr(self, name)
            if value is not None and value <= 0:
                raise ValueError(f"{name}={value}: must be positive")
        if self.temperature is not None and self.temperature < 0:
            raise ValueError(f"temperature={self.temperature}: must be >= 0 (0: greedy)")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p={self.top_p}: must be in (0, 1]")


def read_records(path: Path) -> list[Any]:
    """The objects of a ``.jsonl`` file (one per line) or of a JSON file holding one list."""
    return [record for _, record in read_located_records(path)]


def read_located_records(path: Path) -> list[tuple[str, Any]]:
    """:func:`read_records`, each record with where it is: ``line N`` of a ``.jsonl`` file, or
    ``row i`` of a JSON list."""
    if not path.is_file():
        raise ValueError(f"prompts: no such file: {path}")
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() == ".jsonl":
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append((f"line {number}", json.loads(line)))
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f"prompts: {path}: row {len(records)} (line {number}): {error}"
                    ) from None
        return records
    try:
        records = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"prompts: {path}: not valid JSON: {error}") from None
    if not isinstance(records, list):
        raise ValueError(f"prompts: {path}: must hold a JSON list of objects, got {type(records).__name__}")
    return [(f"row {index}", record) for index, record in enumerate(records)]


def _check_text(value: Any, where: str, what: str) -> None:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{where}: {what} must be a non-empty string")


def alpaca_eval_prompts(records: list[Any], path: Path) -> list[dict[str, Any]]:
    """``records``, each checked to be an object with a non-empty ``instruction``."""
    for index, record in enumerate(records):
        where = f"prompts: {path}: row {index}"
        if not isinstance(record, dict):
            raise ValueError(f"{where}: must be an object with an 'instruction'")
        _check_text(record.get("instruction"), where, "'instruction'")
    return records


def mt_bench_questions(records: list[Any], path: Path) -> list[dict[str, Any]]:
    """``records``, each checked to be a question with a ``question_id`` and non-empty ``turns``
    (``category`` picks the temperature; FastChat's 0.7 without one)."""
    for index, record in enumerate(records):
        where = f"prompts: {path}: row {index}"
        if not isinstance(record, dict) or "question_id" not in record:
            raise ValueError(f"{where}: must be an object with 'question_id' and 'turns' (and a 'category')")
        turns = record.get("turns")
        if not isinstance(turns, list) or not turns:
            raise ValueError(f"{where}: 'turns' must be a non-empty list of strings")
        for turn, text in enumerate(turns):
            _check_text(text, where, f"turns[{turn}]")
    return records


def answer_turns(
    model, tokenizer, questions, temperatures, args: GenerateArguments, backend="auto"
) -> list[list[str]]:
    """Every question's answers, turn by turn: turn ``t`` of all questions that have one is
    answered in one batched pass, with the earlier turns and answers in the conversation;
    ``backend`` samples (``--generation_backend``)."""
    from sapo.evaluation.answers import answer_conversations

    answers: list[list[str]] = [[] for _ in questions]
    for turn in range(max(len(question) for question in questions)):
        open_questions = [i for i, question in enumerate(questions) if len(question) > turn]
        conversations = []
        for i in open_questions:
            history = []
            for asked, answered in zip(questions[i][:turn], answers[i]):
                history += [{"role": "user", "content": asked}, {"role": "assistant", "content": answered}]
            conversations.append(history + [{"role": "user", "content": questions[i][turn]}])
        texts = answer_conversations(
            model, tokenizer, conversations, [temperatures[i] for i in open_questions],
            args.max_new_tokens, top_p=args.top_p, batch_size=args.batch_size, seed=args.seed + turn,
            progress=True, backend=backend, version=0,  # the weights stay as loaded
        )  # fmt: skip
        for i, text in zip(open_questions, texts):
            answers[i].append(text)
    return answers


def prepare_generate(argv: Sequence[str]) -> Callable[[], None]:
    from sapo.checkpoints import write_whole
    from sapo.cli.evaluate import REPLACED, evaluation_model, evaluation_tokenizer
    from sapo.config import GenerationOptions
    from sapo.sampling.vllm import backend_for

    parser = ArgumentParser((GenerateArguments, ModelArguments, GenerationOptions), "sapo generate")
    args, model_args, generation_args = parser.parse(argv)
    prompts, output = Path(args.prompts), Path(args.output)
    if not output.parent.is_dir():
        raise ValueError(f"output: no such folder: {output.parent}")
    if output.resolve() == prompts.resolve():
        raise ValueError(f"output: {output} is the prompts file")
    located = read_located_records(prompts)[: args.max_prompts]
    records = [record for _, record in located]
    if not records:
        raise ValueError(f"prompts: {prompts} holds no prompts")
    arena_version = arena_questions = None
    if args.suite == "alpaca-eval":
        records = alpaca_eval_prompts(records, prompts)
        questions = [[record["instruction"]] for record in records]
        temperatures = [args.temperature or 0.0] * len(records)
    elif args.suite == "arena-hard":
        arena_version, arena_questions = arena_hard.read_questions(located, str(prompts))
        questions = [list(question.turns) for question in arena_questions]
        temperatures = [args.temperature or 0.0] * len(records)
    else:
        records = mt_bench_questions(records, prompts)
        questions = [record["turns"] for record in records]
        temperatures = [
            args.temperature
            if args.temperature is not None
            else MT_BENCH_TEMPERATURES.get(record.get("category"), MT_BENCH_DEFAULT_TEMPERATURE)
            for record in records
        ]
    default_tokens = arena_hard.MAX_NEW_TOKENS[arena_version] if arena_version else MAX_NEW_TOKENS[args.suite]
    args.max_new_tokens = args.max_new_tokens or default_tokens
    generator = args.generator or _model_name(model_args.model_name_or_path)
    tokenizer = evaluation_tokenizer(model_args)
    if tokenizer.chat_template is None:
        raise ValueError("chat_template: the tokenizer has none; set `--chat_template` (a template or file)")
    model = evaluation_model(model_args, tokenizer, seed=args.seed)
    backend = backend_for(generation_args, model, seed=args.seed)

    def run() -> None:
        answers = answer_turns(model, tokenizer, questions, temperatures, args, backend)
        ids = answer_ids(len(records), args.seed)
        if args.suite == "alpaca-eval":
            outputs = [
                {**record, "output": turns[0], "generator": generator}
                for record, turns in zip(records, answers)
            ]
            text = json.dumps(outputs, indent=2, ensure_ascii=False) + "\n"
        else:
            if args.suite == "arena-hard":
                lines = arena_hard_lines(arena_version, arena_questions, answers, ids, generator, tokenizer)
            else:
                lines = [
                    {
                        "question_id": record["question_id"],
                        "answer_id": answer_id,
                        "model_id": generator,
                        "choices": [{"index": 0, "turns": turns}],
                        "tstamp": time.time(),
                    }
                    for record, turns, answer_id in zip(records, answers, ids)
                ]
            text = "".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines)
        replaced = write_whole(output, text)  # whole: a second run at once leaves one run's answers
        version = f" ({arena_version})" if arena_version else ""
        earlier = REPLACED if replaced else ""
        print(f"wrote {len(records)} answers{version} by {generator} to {output}{earlier}")

    return run


def answer_ids(count: int, seed: int) -> list[str]:
    """``count`` answer ids drawn from ``seed``: 22 characters of shortuuid's alphabet, as
    FastChat's and arena-hard-auto's ``shortuuid.uuid()`` writes them."""
    draws = random.Random(seed)
    return ["".join(draws.choice(ID_ALPHABET) for _ in range(22)) for _ in range(count)]


def arena_hard_lines(version, questions, answers, ids, generator, tokenizer) -> list[dict[str, Any]]:
    """Arena-Hard answer lines of ``version`` in question order, each answer's ``token_len``
    counted with the model's tokenizer."""
    lines = []
    for question, turns, answer_id in zip(questions, answers, ids):
        token_lens = [len(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in turns]
        lines.append(
            arena_hard.answer_line(version, question, turns, token_lens, generator, answer_id, time.time())
        )
    return arena_hard.in_question_order(lines, version)


def _model_name(name: str) -> str:
    """A file-safe name for the model: the last part of its path or id."""
    last = name.rstrip("/").split("/")[-1]
    return re.sub(r"[^\w.-]+", "-", last).strip("-") or "model"
