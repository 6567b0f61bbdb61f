"""sapo: Self-Augmented Preference Optimization (arXiv 2405.20830) for causal language models."""

from .config import SAPOConfig
from .trainer import SAPOTrainer

__all__ = ["SAPOConfig", "SAPOTrainer"]
__version__ = "0.1.0"
