"""kltd: knowledge distillation of language models on two independent axes (prefix x trajectory)."""

__version__ = "0.1.0"
