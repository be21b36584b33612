"""Declarative LoRA/DoRA fine-tuning recipes on quantised bases (see README.md)."""

import warnings

# peft 0.21 reads `model.is_gradient_checkpointing` whenever it wraps a model, a property transformers 5 deprecates:
# a FutureWarning on every run that no user of this project can act on.
warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated.*", category=FutureWarning)
