"""Sweeps: a search over recipe fields declared as data (sweeps.json), run as an Optuna study whose trials are
ordinary training runs, pruned early when losing; results as tables, plots and the best recipe. Comes after
eval.harness in the import order: a sweep's objective is a task metric, which the harness scores."""
