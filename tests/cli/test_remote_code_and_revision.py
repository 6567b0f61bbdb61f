"""`--trust_remote_code` and `--model_revision` (TRL's names) reach `from_pretrained` in every
command that loads a model: a folder whose model ships its own code is refused without the flag,
with one line naming it, and loads with it; a revision picks that snapshot of a Hub model from
a local cache built here (offline)."""

import json
import types

import huggingface_hub.constants
import pytest
from sapo_command import run_sapo, sapo_error_line

from sapo.builtin.tiny import char_tokenizer, tiny_llama
from sapo.cli.arguments import ModelArguments
from sapo.cli.loading import load_model, load_tokenizer
from sapo.policy import prepare_policy

CONFIGURATION = """from transformers import LlamaConfig


class EchoConfig(LlamaConfig):
    model_type = "sapo-echo"
"""
MODELING = """from transformers import LlamaForCausalLM

from .configuration_echo import EchoConfig


class EchoForCausalLM(LlamaForCausalLM):
    config_class = EchoConfig
"""
REPO = "sapo-test/tiny"
COMMITS = {"main": "a" * 40, "v2": "b" * 40}  # main holds builtin:tiny, v2 builtin:small
V2_TEMPLATE = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"


@pytest.fixture(scope="module")
def custom_model(tmp_path_factory):
    """A tiny Llama saved with its own configuration and modeling code (auto_map)."""
    folder = tmp_path_factory.mktemp("custom")
    tokenizer = char_tokenizer()
    tiny_llama(tokenizer, "tiny", seed=0).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / "configuration_echo.py").write_text(CONFIGURATION)
    (folder / "modeling_echo.py").write_text(MODELING)
    config = json.loads((folder / "config.json").read_text())
    config.update(
        model_type="sapo-echo",
        architectures=["EchoForCausalLM"],
        auto_map={
            "AutoConfig": "configuration_echo.EchoConfig",
            "AutoModelForCausalLM": "modeling_echo.EchoForCausalLM",
        },
    )
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """A Hub cache holding two snapshots of ``sapo-test/tiny``: ``main`` and the tag ``v2``."""
    cache = tmp_path / "hub"
    # huggingface_hub reads both from the environment once, when it is imported
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    repo = cache / "models--sapo-test--tiny"
    (repo / "refs").mkdir(parents=True)
    for (ref, commit), size in zip(COMMITS.items(), ("tiny", "small")):
        tokenizer = char_tokenizer()
        if ref == "v2":
            tokenizer.chat_template = V2_TEMPLATE
        tiny_llama(tokenizer, size, seed=0).save_pretrained(repo / "snapshots" / commit)
        tokenizer.save_pretrained(repo / "snapshots" / commit)
        (repo / "refs" / ref).write_text(commit)
    return cache


def parameters(size):
    return sum(p.numel() for p in tiny_llama(char_tokenizer(), size).parameters())


def test_remote_code_is_refused_without_the_flag_in_every_command(custom_model, tmp_path):
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": "12*3="}]))
    model = ["--model_name_or_path", str(custom_model)]
    data = ["--dataset_name", "builtin:multiplication", "--output_dir", str(tmp_path / "out")]
    commands = {
        "train": ["train", *model, *data, "--max_steps", "1", "--use_cpu", "true"],
        "sft": ["sft", *model, *data, "--max_steps", "1", "--use_cpu", "true"],
        "spin": ["spin", *model, *data, "--use_cpu", "true"],
        "eval": ["eval", *model, "--dataset_name", "builtin:multiplication", "--max_rows", "2",
                 "--output_file", str(tmp_path / "eval.json")],
        "generate": ["generate", "--suite", "alpaca-eval", *model, "--prompts", str(prompts),
                     "--output", str(tmp_path / "answers.json")],
        "plan": ["plan", *model],
    }  # fmt: skip
    for command, argv in commands.items():
        line = sapo_error_line(argv)
        assert str(custom_model) in line and "--trust_remote_code" in line, (command, line)
    assert not (tmp_path / "out").exists() and not (tmp_path / "answers.json").exists()


def test_remote_code_runs_with_the_flag(custom_model, tmp_path):
    args = ModelArguments(model_name_or_path=str(custom_model), trust_remote_code=True)
    model = load_model(args, load_tokenizer(args))
    assert type(model).__name__ == "EchoForCausalLM" and model.config.model_type == "sapo-echo"
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"instruction": "12*3="}]))
    argv = ["generate", "--suite", "alpaca-eval", "--model_name_or_path", str(custom_model),
            "--trust_remote_code", "--prompts", str(prompts), "--output", str(tmp_path / "answers.json"),
            "--max_new_tokens", "4"]  # fmt: skip
    assert run_sapo(argv)[0] == 0 and json.loads((tmp_path / "answers.json").read_text())[0]["generator"]
    status, out, _ = run_sapo(["plan", "--model_name_or_path", str(custom_model), "--trust_remote_code"])
    assert status == 0 and json.loads(out.strip().splitlines()[-1])["parameters"] == parameters("tiny")


def test_a_revision_loads_that_snapshot(hub_cache):
    main_args = ModelArguments(model_name_or_path=REPO)
    v2_args = ModelArguments(model_name_or_path=REPO, model_revision="v2")
    pinned = ModelArguments(model_name_or_path=REPO, model_revision=COMMITS["v2"])
    for args, size in ((main_args, "tiny"), (v2_args, "small"), (pinned, "small")):
        tokenizer = load_tokenizer(args)
        model = load_model(args, tokenizer)
        assert sum(p.numel() for p in model.parameters()) == parameters(size)
        assert (tokenizer.chat_template == V2_TEMPLATE) == (size == "small")
    for revision, size in ((None, "tiny"), ("v2", "small")):
        flags = ["--model_revision", revision] if revision else []
        status, out, _ = run_sapo(["plan", "--model_name_or_path", REPO, *flags])
        assert status == 0 and json.loads(out.strip().splitlines()[-1])["parameters"] == parameters(size)
    line = sapo_error_line(["plan", "--model_name_or_path", REPO, "--model_revision", "v3"])
    assert REPO in line  # no such snapshot in the cache


def test_a_trainer_given_a_model_id_loads_its_tokenizer_from_the_same_revision(hub_cache):
    args = types.SimpleNamespace(model_init_kwargs={"revision": "v2"}, disable_dropout=False, seed=0)
    model, tokenizer = prepare_policy(REPO, args)
    assert sum(p.numel() for p in model.parameters()) == parameters("small")
    assert tokenizer.chat_template == V2_TEMPLATE


def test_built_in_models_have_no_revisions():
    line = sapo_error_line(["plan", "--model_name_or_path", "builtin:tiny", "--model_revision", "v2"])
    assert "model_revision" in line and "builtin:tiny" in line
    with pytest.raises(ValueError, match="model_revision"):
        load_tokenizer(ModelArguments(model_name_or_path="builtin:tiny", model_revision="v2"))
