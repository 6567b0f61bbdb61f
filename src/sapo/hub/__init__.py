"""What goes to the Hugging Face Hub with a trained model: its model card (:mod:`sapo.hub.model_card`)."""

from sapo.hub.model_card import SAPO, SPIN, Method, build_model_card, write_model_card

__all__ = ["SAPO", "SPIN", "Method", "build_model_card", "write_model_card"]
