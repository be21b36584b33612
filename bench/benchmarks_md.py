"""Writing one benchmark's block into BENCHMARKS.md: the one rule every bench/ script's --write follows, and the
hardware words every block's Machine line starts with."""

from __future__ import annotations

import platform
from pathlib import Path


def hardware_name() -> str:
    """The GPU's name, or the CPU's model name with its kind (a figure names the kind it ran on, e.g.
    "AMD EPYC (AVX512-BF16)")."""
    import torch

    from lora.core.compute_dtype import cpu_flags, cpu_kind, cpu_model_name

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0)
    return f"{cpu_model_name() or platform.processor()} ({cpu_kind(cpu_flags())})"


def write_block(path: Path, heading: str, begin: str, end: str, block: str) -> None:
    """Replace the text between `begin` and `end` markers with `block` (markers included in `block`), or add it at
    the end of the `heading` section, or add the section at the end of the file."""
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in text and end in text:
        text = text[: text.index(begin)] + block + text[text.index(end) + len(end):]
    elif heading in text:  # a new block at the end of the section
        start = text.index(heading)
        next_section = text.find("\n## ", start + len(heading))
        cut = len(text) if next_section == -1 else next_section
        text = text[:cut].rstrip("\n") + "\n\n" + block + "\n" + text[cut:]
    else:
        text = text.rstrip("\n") + f"\n\n{heading}\n\n" + block + "\n"
    path.write_text(text)
    print(f"wrote {path}")
