"""The one owner of what a recipe's `"auto"` dtype means on this machine: bfloat16 where it is native, else float32.

    from lora.core.compute_dtype import choose_dtype
    name, reason = choose_dtype()     # ("bfloat16", "CPU has native bf16 arithmetic (avx512_bf16)") or ("float32", ...)

bf16 is native on CUDA devices that support it and on CPUs with AVX512-BF16 or AMX (Intel Xeon 4th gen+, AMD EPYC
Zen 4/5). CPUs with AVX2 only emulate bf16 matmuls, about 3x slower than fp32, so they get float32. torch's
`get_cpu_capability()` stops at "AVX512" and does not say whether bf16 instructions exist, so the CPU's flags decide.
"""

from __future__ import annotations

import functools
from pathlib import Path

__all__ = [
    "AUTO",
    "AUTO_FIELDS",
    "choose_dtype",
    "cpu_flags",
    "cpu_kind",
    "cpu_model_name",
    "CPUINFO",
    "dtype_for",
    "NATIVE_BF16_CPU_FLAGS",
    "resolve_auto_dtypes",
]

AUTO = "auto"
AUTO_FIELDS = ("bnb_4bit_compute_dtype", "dtype")
NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")
CPUINFO = Path("/proc/cpuinfo")


def _cpuinfo_value(keys: tuple[str, ...], cpuinfo: Path) -> str | None:
    """The first value /proc/cpuinfo gives for any of `keys` (None where the file or the key is missing, e.g. macOS)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return None
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in keys:
            return value.strip()
    return None


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str]:
    """The CPU feature flags the kernel reports (empty where /proc/cpuinfo is missing, e.g. macOS)."""
    return set((_cpuinfo_value(("flags", "Features"), cpuinfo) or "").split())


def cpu_model_name(cpuinfo: Path = CPUINFO) -> str | None:
    """The CPU's model name as the kernel reports it ("AMD EPYC"), None where it does not."""
    return _cpuinfo_value(("model name",), cpuinfo)


def cpu_kind(flags: set[str]) -> str:
    """The CPU kind in the words the README and BENCHMARKS use (the kinds differ in bf16 speed and bitsandbytes'
    code paths), e.g. "AVX512-BF16 + AMX", "AVX512-BF16", "AVX2, no AVX512-BF16"."""
    if "avx512_bf16" in flags:
        return "AVX512-BF16 + AMX" if "amx_bf16" in flags else "AVX512-BF16"
    if "amx_bf16" in flags:
        return "AMX"
    return "AVX2, no AVX512-BF16" if "avx2" in flags else "no AVX2"


def dtype_for(cuda_bf16: bool | None, flags: set[str]) -> tuple[str, str]:
    """The decision itself, from the facts: (dtype name, reason in words).

    Args:
        cuda_bf16: None without a CUDA device, else whether it supports bf16.
        flags: the CPU's feature flags (used only without a CUDA device).
    """
    if cuda_bf16 is not None:
        if cuda_bf16:
            return "bfloat16", "CUDA device with bf16 support"
        return "float32", "CUDA device without bf16 support"
    native = [flag for flag in NATIVE_BF16_CPU_FLAGS if flag in flags]
    if native:
        return "bfloat16", f"CPU has native bf16 arithmetic ({', '.join(native)})"
    return "float32", "CPU without AVX512-BF16/AMX: bf16 matmuls would be emulated, about 3x slower than float32"


@functools.cache
def choose_dtype() -> tuple[str, str]:
    """What "auto" resolves to on this machine, and why (probed once per process)."""
    cuda_bf16 = None
    try:
        import torch

        if torch.cuda.is_available():
            cuda_bf16 = bool(torch.cuda.is_bf16_supported())
    except ImportError:  # --dry-run on a machine without torch: only the CPU can be asked
        pass
    return dtype_for(cuda_bf16, cpu_flags())


def resolve_auto_dtypes(fields: dict) -> dict[str, dict[str, str]]:
    """Replace every "auto" dtype field in `fields` by this machine's choice; returns what was resolved and why."""
    resolved = {}
    for key in AUTO_FIELDS:
        if fields.get(key) == AUTO:
            name, reason = choose_dtype()
            fields[key] = name
            resolved[key] = {"from": AUTO, "value": name, "reason": reason}
    return resolved
