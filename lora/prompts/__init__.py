"""What training, evaluation, GRPO and serving share about text: data rows, prompt templates and the one encoding
rule, answer parsing, rewards, stop tokens and greedy generation. Imports only lora.core."""
