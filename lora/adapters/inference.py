"""An adapter on its base, ready for inference: the one loader evaluation, serving, merge and normalisation use."""

from __future__ import annotations

from pathlib import Path

from lora.adapters.folders import resolve_base_model_path


def load_base_for_adapter(adapter_dir: str | Path, override: str | None = None, dtype: str = "float32"):
    """The adapter's base model, always UNQUANTISED (also when training used a 4-bit/8-bit base), in eval mode.

    Args:
        adapter_dir: the adapter folder.
        override: `--base-model` from the command line, if any.
        dtype: "float32", "bfloat16" or "float16".

    Returns:
        (model, tokenizer, base path, origin). The tokenizer is the adapter folder's own when it has one (the
        runner saves it there), else the base model's.
    """
    from lora.models.loading import load_base_model, load_tokenizer

    path, origin = resolve_base_model_path(adapter_dir, override)
    model = load_base_model(path, None, dtype=dtype).eval()
    folder = Path(adapter_dir).expanduser().resolve()
    has_tokenizer = any((folder / name).is_file() for name in ("tokenizer.json", "tokenizer.model"))
    tokenizer = load_tokenizer(str(folder) if has_tokenizer else path)
    return model, tokenizer, path, origin
