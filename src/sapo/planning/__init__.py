"""How much memory a SAPO run needs on each device, before it runs: ``sapo plan``'s model.

:mod:`sapo.planning.shape` reads what matters of a model from its ``config.json`` (built on the
meta device: no weights); :mod:`sapo.planning.memory` turns it and a
:class:`~sapo.planning.setup.Setup` (placement, precision, optimizer, batch, lengths) into bytes
per device, by part and by phase of a step.
"""

from sapo.planning.memory import GIB, MemoryPlan, plan_memory
from sapo.planning.setup import DISTRIBUTED, Setup
from sapo.planning.shape import ModelShape, load_model_config, model_shape

__all__ = [
    "DISTRIBUTED",
    "GIB",
    "MemoryPlan",
    "ModelShape",
    "Setup",
    "load_model_config",
    "model_shape",
    "plan_memory",
]
