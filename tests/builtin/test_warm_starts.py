"""Every shipped warm start is the model its recipe trains: the recipe's size, the recipe's task,
and a model that learned it (it answers the task's format), loadable with AutoModelForCausalLM."""

from pathlib import Path

import pytest
import yaml
from transformers import AutoModelForCausalLM

from sapo.builtin import BUILTIN_CHECKPOINTS, builtin_name, checkpoint_path
from sapo.builtin.tasks import TASKS, task_scores
from sapo.builtin.tiny import TINY_MODEL_SIZES

RECIPES = Path(__file__).resolve().parents[2] / "recipes" / "warm-start"


@pytest.mark.parametrize("name", BUILTIN_CHECKPOINTS)
def test_shipped_warm_start_matches_its_recipe(name, tokenizer):
    recipe = yaml.safe_load((RECIPES / f"{name}.yaml").read_text())
    size, task = builtin_name(recipe["model_name_or_path"]), builtin_name(recipe["dataset_name"])
    assert name == f"{size}-{task}-sft" and task in TASKS
    model = AutoModelForCausalLM.from_pretrained(checkpoint_path(name))
    for field, value in TINY_MODEL_SIZES[size].items():
        assert getattr(model.config, field) == value, field
    assert model.config.vocab_size == len(tokenizer)
    # trained: well below the edit distance of an untrained model (about 1: nothing right)
    scores = task_scores(model, tokenizer, task, "validation", count=20)
    assert scores["edit_distance"] < 0.3, scores
