"""``skip_tied_pairs``: pairs whose rewrite equals the gold answer stay out of the replay buffer."""

import pytest
from test_trainer import make_args

from sapo import SAPOTrainer
from sapo.builtin.tasks import task_dataset
from sapo.cli.arguments import ModelArguments
from sapo.cli.loading import load_model


class BufferWatch(SAPOTrainer):
    """Records every pair that enters the buffer and the tie fraction of every generation call."""

    def generate_pairs(self, rows, step):
        before = len(self.buffer)
        super().generate_pairs(rows, step)
        self.entered = getattr(self, "entered", []) + self.buffer.items()[before:]


@pytest.mark.parametrize("skip", [False, True])
def test_ties_are_logged_and_kept_out_of_the_buffer_when_asked(tmp_path, tokenizer, skip):
    # the multiplication warm start rewrites a 3-token segment to the gold answer about 40% of the time
    model = load_model(ModelArguments(model_name_or_path="builtin:tiny-multiplication-sft"), tokenizer)
    rows = task_dataset("multiplication", "preference").select(range(64))
    args = make_args(
        tmp_path, max_steps=8, logging_steps=4, segment_length=3, max_length=32, skip_tied_pairs=skip,
        replay_buffer_size=64,
    )  # fmt: skip
    trainer = BufferWatch(model=model, args=args, train_dataset=rows, processing_class=tokenizer)
    trainer.train()
    ties = [
        entry["sapo/tied_fraction"] for entry in trainer.state.log_history if "sapo/tied_fraction" in entry
    ]
    assert len(ties) == 2 and all(0.0 < fraction < 1.0 for fraction in ties)
    tied_in_buffer = [pair.tied for pair in trainer.entered]
    assert len(trainer.entered) == (round(8 * 8 * (1 - sum(ties) / 2)) if skip else 8 * 8)
    assert not any(tied_in_buffer) if skip else any(tied_in_buffer)
