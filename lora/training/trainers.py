"""The table of trainers, as a run builds them: the recipe's `trainer` names the module that reads its training
data and builds its trainer. lora/training/run.py asks this table and has no branch per trainer.

The other half of each entry, the fields only that trainer accepts and its recipe checks, is
`lora/recipes/trainers.py` (TRAINERS), where the registry can read it without importing torch or TRL.
tests/test_trainers.py keeps the two tables' keys equal.

Adding a trainer ("dpo", say) is one entry and one module:
  1. its rules in lora/recipes/trainers.py (fields and checks; the fields declared in recipe_schema.json, and the
     name added to the schema's `trainer` enum);
  2. one module, `lora/training/dpo.py`, named below as `"dpo": "lora.training.dpo"`, that defines
       load_training_data(recipe, tokenizer) -> (data, description)
           reads (and encodes) the training data before any score is taken, so that a bad file stops the run
           early; `description` completes the milestone "data: ..." (e.g. "120 preference pairs");
       build_recipe_trainer(recipe, model, tokenizer, data, checkpoint_dir) -> (trainer, history)
           a Trainer subclass built on lora.training.sft.RecipeTrainer (its `train`, `state` and
           `total_answer_tokens()` are what run.py uses) and the TrainingHistory its callbacks fill
           (lora.training.sft.ProgressAndGuard gives losses, wall time and the non-finite-loss guard).
The modules are imported when a run asks for them, so --list and --dry-run never load TRL.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["BUILDERS", "BUILDER_FUNCTIONS", "trainer_module"]

# recipe["trainer"] -> the module in lora/training/ that builds it.
BUILDERS: dict[str, str] = {
    "sft": "lora.training.sft",
    "grpo": "lora.training.grpo",
    "rloo": "lora.training.rloo",
    "dpo": "lora.training.dpo",
}
# What run.py calls on each module, in this order.
BUILDER_FUNCTIONS = ("load_training_data", "build_recipe_trainer")


def trainer_module(name: str) -> ModuleType:
    """The module that builds trainer `name` (a name the registry has already validated).

    Raises:
        KeyError: `name` has rules in lora/recipes/trainers.py but no builder here (a bug: the tables disagree).
    """
    return importlib.import_module(BUILDERS[name])
