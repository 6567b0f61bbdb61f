"""The training settings every tiny-model run on a CPU shares: the demo, the benchmarks, the tests.

A 0.1M-parameter model trains in float32 on any machine, logs and saves nothing it is not asked
to, and decays its learning rate linearly to 0 with no weight decay. Each caller overrides what
it measures.
"""

from __future__ import annotations

from typing import Any


def tiny_run_args(
    output_dir: str, steps: int, batch_size: int, learning_rate: float, seed: int = 0, **overrides: Any
) -> dict[str, Any]:
    """Keyword arguments for a `TrainingArguments` subclass (`SAPOConfig`, TRL's configs)."""
    settings = dict(
        output_dir=output_dir,
        max_steps=steps,
        per_device_train_batch_size=batch_size,
        learning_rate=learning_rate,
        lr_scheduler_type="linear",
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=False,
        logging_steps=min(10, steps),
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=seed,
    )
    settings.update(overrides)
    return settings
