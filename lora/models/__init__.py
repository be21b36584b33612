"""Base models: where their weights come from, how they are quantised (one settings object), loading them, and
memory estimates."""
