"""The recipe registry (finetune_configs.json), its JSON schema, and where a recipe's outputs live."""
