"""sapo: Self-Augmented Preference Optimization (arXiv 2405.20830) for causal language models."""

from sapo.config import SAPOConfig
from sapo.trainer import SAPOTrainer

__all__ = ["SAPOConfig", "SAPOTrainer"]
__version__ = "0.1.0"
