"""Writing one benchmark's block into BENCHMARKS.md: the one rule every bench/ script's --write follows."""

from __future__ import annotations

from pathlib import Path


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
