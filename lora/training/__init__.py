"""Training: one run of a recipe (SFT or GRPO trainer), its run folder and checkpoints, run record, model card and
experiment trackers. Does not import eval/: scoring is handed in by the command."""
