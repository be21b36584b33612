"""Neutralisers for two bitsandbytes 0.50 CPU defects; import this module before any model is loaded.

1. On CPUs with AVX512-BF16, the first no-grad forward of a `Linear4bit` repacks its weight in place for an
   inference-only kernel. Afterwards adapter gradients are silently wrong, layers with bias or odd shapes crash,
   and dequantising the weight (which DoRA does) returns garbage. We switch the repacking off: the packed
   kernel is only a CPU inference speed-up, and correctness of training after an eval pass matters more.
2. 8-bit + DoRA crashes on the second forward: peft moves the weight on every DoRA forward, `Int8Params.to()`
   drops `SCB`, and the next `init_8bit_state()` copies that None into the layer state. We keep the previous
   scales when the new ones are missing (the int8 weight itself is unchanged by the move).

Both patches are idempotent and harmless on GPUs. tests/test_bnb_cpu_fixes.py shows each one is needed.
"""

from __future__ import annotations

import functools

import bitsandbytes.nn.modules as bnb_modules

__all__ = ["apply", "disable_cpu_weight_repacking"]

_APPLIED = False


def _no_avx512bf16() -> bool:
    return False


def _keep_scales_when_missing(init_8bit_state):
    @functools.wraps(init_8bit_state)
    def init_8bit_state_keeping_scales(self):
        previous_scales = self.state.SCB
        init_8bit_state(self)
        if self.state.SCB is None and previous_scales is not None:
            self.state.SCB = previous_scales

    init_8bit_state_keeping_scales.keeps_scales = True
    return init_8bit_state_keeping_scales


def apply() -> None:
    """Install both neutralisers (safe to call more than once)."""
    global _APPLIED
    if _APPLIED:
        return
    # Linear4bit.__init__ reads this module-level name to set `support_avx512bf16_for_cpu`.
    bnb_modules.has_avx512bf16 = _no_avx512bf16
    linear8 = bnb_modules.Linear8bitLt
    if not getattr(linear8.init_8bit_state, "keeps_scales", False):
        linear8.init_8bit_state = _keep_scales_when_missing(linear8.init_8bit_state)
    _APPLIED = True


def disable_cpu_weight_repacking(model) -> None:
    """Belt and braces for models whose layers were built before `apply()` ran."""
    for module in model.modules():
        if isinstance(module, bnb_modules.Linear4bit):
            module.support_avx512bf16_for_cpu = False


apply()
