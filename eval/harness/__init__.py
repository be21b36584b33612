"""The evaluation harness: task registry, choice scoring, metrics, the scoring loop, result tables and lm-eval
export."""
