"""Fast DoRA: peft 0.21's DoRA, same math and same saved adapters, at close to LoRA's cost.

    from lora.adapters.fast_dora import enable_fast_dora
    peft_model = get_peft_model(model, LoraConfig(..., use_dora=True))   # or PeftModel.from_pretrained(...)
    enable_fast_dora(peft_model)                                          # returns the number of layers switched

Stock peft DoRA computes, per layer and per forward, g = m / ||W + s·B A||_row (the norm detached) and
y = base(x) + (g - 1) ⊙ (base(x) - bias) + g ⊙ s·lora(x). To get the norm it materialises B A through an
identity matrix, dequantises the whole base weight a second time (4-bit/8-bit), and forms W + s·B A.

We keep that math and change only how it is evaluated:
- The row norm is factored: ||W_i + s·B_i A||² = ||W_i||² + B_i · (2s·(W Aᵀ)_i + s²·(A Aᵀ) B_iᵀ), in fp32.
  ||W_i||² is cached (W is frozen); W Aᵀ is [out, r]. For an unquantised base it is one thin matmul with the
  weight; for LLM.int8 it comes from the int8 weight and its row scales (pushing A through the layer would
  quantise A); for 4-bit the layer's forward is taken over so that ONE fp32 dequantisation serves both the base
  GEMM (cast to the compute dtype, exactly as bitsandbytes does it) and W Aᵀ.
- The output is composed by one fused autograd function (row scaling, the low-rank term, the magnitude; backward
  including the magnitude's gradient) that keeps only its own output y for backward, where stock keeps the base
  and the LoRA outputs: the magnitude's gradient is Σ_t dy ⊙ (y - bias) / m. Where the next op keeps y anyway
  (Llama's gate/up projections) this costs nothing; elsewhere it is one [tokens, out] activation per layer more
  than LoRA, which no exact method avoids without recomputing a base GEMM in backward. Its forward and backward
  are each compiled by torch.compile into one kernel on CUDA (eager elsewhere; `FAST_DORA_COMPILE`, below).
- The per-row norm is computed once per optimiser step, not per micro-batch and not again in a checkpoint
  recompute: it is cached until an adapter weight changes, keyed by the LoRA A/B and magnitude tensors'
  identities and version counters, the scaling, the base weight and a count of optimiser steps (fused AdamW and
  bitsandbytes' optimisers update parameters without bumping version counters; every torch optimiser's step
  runs a global post-step hook that bumps the count). No dense B A is ever formed. Writes through `.data`
  bypass both counters: call `clear_fast_dora_cache(model)` after them.
- No second dequantisation of a 4-bit or 8-bit base weight per forward: with a cached norm the layer runs only
  bitsandbytes' own GEMM; when the norm is due, one dequantisation serves the GEMM and W Aᵀ (4-bit), or W Aᵀ
  comes from the int8 weight itself (8-bit).
- With lora_dropout > 0 in training, peft runs the base layer a second time on the dropped-out input (its
  `base_result=None` branch); we do the same, for quantised bases with the dequantised weight shared with
  W Aᵀ and recomputed in backward rather than kept. Op by op, autograd would also keep, per adapted layer, a
  float dropout mask, the dropped-out input, and both base(x_d) and the LoRA output; we keep a bool mask
  (x_d is rebuilt from the shared input in backward) and their one weighted sum, which is all the
  magnitude's gradient needs.

Parameters, state_dict keys, merging and the saved format are peft's own: the variant subclasses peft's
`DoraLinearVariant` and only replaces `forward`, and `lora_magnitude_vector[adapter]` stays peft's module.
"""

from __future__ import annotations

import copy
import os

import torch
import torch.nn.functional as F
from peft.tuners.lora import layer as lora_layer
from peft.tuners.lora.variants import DoraLinearVariant
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

__all__ = [
    "clear_fast_dora_cache",
    "COMPILE_ENV",
    "composition_backward",
    "composition_forward",
    "disable_fast_dora",
    "enable_fast_dora",
    "FastDoraLinearVariant",
]

try:
    import bitsandbytes as bnb
    from peft.tuners.lora import bnb as lora_bnb
except ImportError:  # bitsandbytes is optional: unquantised bases still get the fast path
    bnb = None
    lora_bnb = None


_INT8_SCALE = 1.0 / 127.0
# "auto": compile the fused composition on CUDA with Triton, run it eagerly elsewhere; "1": always; "0": never.
COMPILE_ENV = "FAST_DORA_COMPILE"


class FastDoraLinearVariant(DoraLinearVariant):
    """peft's DoRA variant for Linear layers with a factored, fp32, cached row norm (init and merges: peft's)."""

    @staticmethod
    def forward(module, active_adapter: str, x: torch.Tensor, result: torch.Tensor, **kwargs) -> torch.Tensor:
        lora_A = module.lora_A[active_adapter]
        lora_B = module.lora_B[active_adapter]
        dropout = module.lora_dropout[active_adapter]
        base_layer = module.get_base_layer()
        if isinstance(dropout, nn.Identity) or not module.training:
            norm = _cached_norm(module, active_adapter)
            if norm is None:
                norm = _row_norm(module, active_adapter, _weight_times_a(base_layer, lora_A.weight))
                _store_norm(module, active_adapter, norm)
            return _compose(module, active_adapter, result, lora_B(lora_A(x)), norm)
        # peft's dropout branch: the DoRA terms use base(dropout(x)) (no bias) instead of the base output.
        x, down = _dropout_then_down(dropout, lora_A, x)
        _, base_of_dropped, weight_times_a, weight_sq = _SharedWeightLinear.apply(
            None, x, lora_A.weight.detach(), base_layer, _needs_weight_sq(module)
        )
        norm = _row_norm(module, active_adapter, weight_times_a, weight_sq)
        return _compose_with_dropout(module, active_adapter, result, base_of_dropped, lora_B(down), norm)


if lora_bnb is not None and hasattr(lora_bnb, "Linear4bit"):

    class FastDoraLinear4bit(lora_bnb.Linear4bit):
        """peft's LoRA Linear4bit whose forward shares one dequantisation between the base GEMM and W Aᵀ.

        Everything that is not a single active fast-DoRA adapter (merged, disabled, mixed batches, autocast,
        several adapters, a cached norm) goes through peft's own forward unchanged.
        """

        def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            adapter = self._fused_adapter(args, kwargs)
            if adapter is None:
                return super().forward(x, *args, **kwargs)
            lora_A = self.lora_A[adapter]
            lora_B = self.lora_B[adapter]
            dropout = self.lora_dropout[adapter]
            lora_x = self._cast_input_dtype(x, lora_A.weight.dtype)
            dropped_x = down = None
            if self.training and not isinstance(dropout, nn.Identity):
                dropped_x, down = _dropout_then_down(dropout, lora_A, lora_x)
            norm = _cached_norm(self, adapter) if dropped_x is None else None
            if norm is not None:  # the norm is current: bitsandbytes' own GEMM (its own kernel choice), nothing else
                result = self.get_base_layer()(x)
                return _compose(self, adapter, result, lora_B(lora_A(lora_x)), norm).to(result.dtype)
            result, base_of_dropped, weight_times_a, weight_sq = _SharedWeightLinear.apply(
                x, dropped_x, lora_A.weight.detach(), self.get_base_layer(), _needs_weight_sq(self)
            )
            norm = _row_norm(self, adapter, weight_times_a, weight_sq)
            _store_norm(self, adapter, norm)
            if dropped_x is None:
                output = _compose(self, adapter, result, lora_B(lora_A(lora_x)), norm)
            else:
                output = _compose_with_dropout(self, adapter, result, base_of_dropped, lora_B(down), norm)
            return output.to(result.dtype)

        def _fused_adapter(self, args, kwargs) -> str | None:
            """The adapter to run fused, or None when peft's forward must run (every case it handles differently)."""
            if args or any(value is not None for value in kwargs.values()):
                return None
            if self.disable_adapters or self.merged or len(self.active_adapters) != 1:
                return None
            adapter = self.active_adapters[0]
            if adapter not in self.lora_A or not isinstance(self.lora_variant.get(adapter), FastDoraLinearVariant):
                return None
            base = self.get_base_layer()
            quant_state = getattr(base.weight, "quant_state", None)
            if (
                torch.is_autocast_enabled(base.weight.device.type)  # without the device, CUDA's autocast only
                or not base.compute_type_is_set  # bitsandbytes picks the compute dtype on its first call
                or quant_state is None
                or getattr(quant_state, "packing_format_for_cpu", False)
                or (base.bias is not None and base.bias.requires_grad)
            ):
                return None
            return adapter

else:  # pragma: no cover - bitsandbytes without 4-bit support
    FastDoraLinear4bit = None


def enable_fast_dora(model: nn.Module) -> int:
    """Switch every DoRA adapter on Linear, bnb Linear4bit and bnb Linear8bitLt LoRA layers to fast DoRA.

    Parameters, state_dict keys and the saved adapter format stay peft's. Works after `get_peft_model` and after
    `PeftModel.from_pretrained`; adapters added later get peft's stock DoRA until this is called again.

    Args:
        model: a peft model (or any module containing peft LoRA layers).

    Returns:
        The number of layers switched (layers already on fast DoRA are not counted again).
    """
    _install_optimizer_step_hook()
    switched_layers = 0
    for module in model.modules():
        if not _supported_layer(module):
            continue
        switched = False
        for adapter, variant in list(module.lora_variant.items()):
            if type(variant) is DoraLinearVariant and not module.lora_bias.get(adapter, False):
                module.lora_variant[adapter] = FastDoraLinearVariant()
                switched = True
        if switched and FastDoraLinear4bit is not None and type(module) is lora_bnb.Linear4bit:
            module.__class__ = FastDoraLinear4bit  # same attributes and parameters, one method differs
        switched_layers += switched
    return switched_layers


def disable_fast_dora(model: nn.Module) -> int:
    """Undo `enable_fast_dora`: back to peft's stock DoRA forward. Returns the number of layers switched back."""
    switched_layers = 0
    for module in model.modules():
        if not isinstance(module, lora_layer.LoraLayer):
            continue
        switched = False
        for adapter, variant in list(module.lora_variant.items()):
            if isinstance(variant, FastDoraLinearVariant):
                module.lora_variant[adapter] = DoraLinearVariant()
                switched = True
        if FastDoraLinear4bit is not None and type(module) is FastDoraLinear4bit:
            module.__class__ = lora_bnb.Linear4bit
        module.__dict__.pop("_fast_dora_norms", None)
        switched_layers += switched
    return switched_layers


def clear_fast_dora_cache(model: nn.Module) -> None:
    """Forget every cached row norm; needed only after adapter weights were written through `.data`."""
    for module in model.modules():
        module.__dict__.pop("_fast_dora_norms", None)


def _supported_layer(module: nn.Module) -> bool:
    supported = [lora_layer.Linear]
    if lora_bnb is not None:
        supported += [getattr(lora_bnb, name) for name in ("Linear4bit", "Linear8bitLt") if hasattr(lora_bnb, name)]
    if FastDoraLinear4bit is not None:
        supported.append(FastDoraLinear4bit)  # a DoRA adapter added after enabling can be switched too
    # fan_in_fan_out (GPT-2 Conv1D) stores the weight transposed; those layers keep peft's implementation.
    return type(module) in supported and not getattr(module, "fan_in_fan_out", False)


def _row_norm(module, adapter: str, weight_times_a: torch.Tensor, weight_sq: torch.Tensor | None = None):
    """||W_i + s·B_i A|| for every output row i, from ||W_i||², W Aᵀ [out, r] and the r x r Gram matrix A Aᵀ.

    Eight small ops: on a GPU these layers are launch-bound, so the op count is what costs time.
    """
    scaling = module.scaling[adapter]
    with torch.no_grad():
        a = _as_fp32(module.lora_A[adapter].weight)
        b = _as_fp32(module.lora_B[adapter].weight)
        if weight_sq is None or not weight_sq.numel():
            weight_sq = _weight_row_sq_norm(module)
        else:
            _remember_weight_sq(module, weight_sq)
        # B_i · (2s·(W Aᵀ)_i + s²·(B (A Aᵀ))_i): one addmm and one row-wise dot product.
        cross_and_square = torch.addmm(weight_times_a, b, F.linear(a, a), beta=2.0 * scaling, alpha=scaling * scaling)
        return torch.linalg.vecdot(b, cross_and_square).add_(weight_sq).clamp_min_(0.0).sqrt_()


def _whole_weight(base_layer: nn.Module) -> torch.Tensor:
    """The base weight, refusing a sharded one: a row norm from a partition would be silently wrong.

    FSDP2 and DeepSpeed ZeRO-3 hold a layer's weight whole inside the adapted layer's forward and backward, which is
    where fast DoRA reads it (its norm and the shared dequantisation), so under them it gets the whole weight; the
    norm cache is keyed by that tensor and the optimiser step count, so it holds only while both are unchanged.
    """
    weight = base_layer.weight
    status = getattr(weight, "ds_status", None)  # a DeepSpeed ZeRO-3 parameter: gathered, or only a partition
    if (status is not None and status.name != "AVAILABLE") or type(weight).__name__ == "DTensor":
        raise RuntimeError(f"fast DoRA was handed a sharded base weight ({type(weight).__name__}, ZeRO-3 status "
                           f"{status}) outside the layer's forward/backward; set fast_dora false for this engine")
    return weight


def _weight_times_a(base_layer: nn.Module, a_weight: torch.Tensor) -> torch.Tensor:
    """W Aᵀ in fp32, [out, r], from the weight as stored (no full dequantisation for int8)."""
    weight = _whole_weight(base_layer)
    with torch.no_grad():
        a = _as_fp32(a_weight)
        if weight.dtype == torch.int8:  # LLM.int8: W = diag(SCB / 127) · CB
            return (F.linear(a, weight.data.float()) * (_int8_row_scales(base_layer) * _INT8_SCALE)).T
        if getattr(weight, "quant_state", None) is not None:
            return F.linear(a, _dequantize_fp32(base_layer)).T
        return F.linear(a, _as_fp32(weight)).T


def _as_fp32(tensor: torch.Tensor) -> torch.Tensor:
    # Callers run without autograd, so no detach; skipping no-op casts saves dispatches on launch-bound GPUs.
    return tensor if tensor.dtype == torch.float32 else tensor.float()


def _weight_row_sq_norm(module) -> torch.Tensor:
    """||W_i||² of the frozen base weight, computed once per weight tensor (W never changes while unmerged)."""
    weight = module.get_base_layer().weight
    key = _weight_key(weight)
    cached = getattr(module, "_fast_dora_weight_sq", None)
    if cached is not None and cached[0] == key:
        return cached[1]
    with torch.no_grad():
        weight_sq = _dequantize_fp32(module.get_base_layer()).pow(2).sum(dim=1)
    module._fast_dora_weight_sq = (key, weight_sq)
    return weight_sq


def _needs_weight_sq(module) -> bool:
    cached = getattr(module, "_fast_dora_weight_sq", None)
    return cached is None or cached[0] != _weight_key(module.get_base_layer().weight)


def _remember_weight_sq(module, weight_sq: torch.Tensor) -> None:
    module._fast_dora_weight_sq = (_weight_key(module.get_base_layer().weight), weight_sq)


def _weight_key(weight: torch.Tensor) -> tuple:
    return (weight.data_ptr(), weight._version, weight.device, tuple(weight.shape))


def _cached_norm(module, adapter: str) -> torch.Tensor | None:
    """The cached row norm if nothing it depends on has changed since it was computed, else None.

    Valid in training too (the norm is a constant in backward): gradient accumulation and checkpoint recomputes
    reuse it until the optimiser steps. Kept on the LoRA layer, not in peft's `_dora_cache`, which every
    `train()` call clears (the Trainer calls it once per micro-batch).
    """
    cached = module.__dict__.get("_fast_dora_norms", {}).get(adapter)
    if cached is not None and cached[0] == _norm_key(module, adapter):
        return cached[1]
    return None


def _store_norm(module, adapter: str, norm: torch.Tensor) -> None:
    module.__dict__.setdefault("_fast_dora_norms", {})[adapter] = (_norm_key(module, adapter), norm)


def _norm_key(module, adapter: str) -> tuple:
    tensors = [module.lora_A[adapter].weight, module.lora_B[adapter].weight]
    tensors.append(module.lora_magnitude_vector[adapter].weight)
    return (
        *((tensor.data_ptr(), tensor._version) for tensor in tensors),
        float(module.scaling[adapter]),
        _weight_key(module.get_base_layer().weight),
        _optimizer_steps_taken,
    )


# Fused AdamW and bitsandbytes' optimisers write parameters without bumping their version counters, so the key
# also holds a count of optimiser steps, kept by a global post-step hook that every torch.optim.Optimizer runs.
_optimizer_steps_taken = 0
_optimizer_step_hook = None


def _install_optimizer_step_hook() -> None:
    global _optimizer_step_hook
    if _optimizer_step_hook is None:
        _optimizer_step_hook = register_optimizer_step_post_hook(_after_optimizer_step)


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    global _optimizer_steps_taken
    _optimizer_steps_taken += 1


def _dequantize_fp32(base_layer: nn.Module) -> torch.Tensor:
    """The base weight [out, in] in fp32 (the stored tensor itself for an fp32 nn.Linear)."""
    weight = _whole_weight(base_layer)
    if weight.dtype == torch.int8:
        return bnb.functional.int8_vectorwise_dequant(weight.data, _int8_row_scales(base_layer))
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        if quant_state.dtype != torch.float32:
            quant_state = copy.copy(quant_state)
            quant_state.dtype = torch.float32
        return bnb.functional.dequantize_4bit(weight.data, quant_state)
    return _as_fp32(weight)  # callers run without autograd


def _int8_row_scales(base_layer: nn.Module) -> torch.Tensor:
    scales = base_layer.state.SCB if base_layer.state.SCB is not None else base_layer.weight.SCB
    return scales.float()


class _SharedWeightLinear(torch.autograd.Function):
    """Base GEMMs and W Aᵀ from one dequantised weight; backward dequantises again instead of keeping it.

    Inputs: x (the base layer's input, or None when the caller already has the base output; only for
    bnb Linear4bit), dropped_x (lora-dtype input for peft's dropout branch, or None), A, the base layer, and
    whether ||W_i||² is wanted. Outputs: base(x) exactly as bitsandbytes computes it, x_d Wᵀ (no bias),
    W Aᵀ [out, r] and ||W_i||² (both fp32, constant); missing outputs are empty tensors.
    """

    @staticmethod
    def forward(ctx, x, dropped_x, a_weight, base_layer, want_weight_sq):
        weight = _dequantize_fp32(base_layer)
        ctx.base_layer = base_layer
        ctx.x_dtype = None if x is None else x.dtype
        ctx.dropped_dtype = None if dropped_x is None else dropped_x.dtype
        result, base_of_dropped, weight_sq = (weight.new_empty(0) for _ in range(3))
        if x is not None:  # Linear4bit.forward + MatMul4Bit: GEMM in the compute dtype, output cast back
            compute_dtype = base_layer.compute_dtype or x.dtype
            bias = None if base_layer.bias is None else base_layer.bias.to(compute_dtype)
            result = F.linear(x.to(compute_dtype), weight.to(compute_dtype), bias).to(x.dtype)
            ctx.compute_dtype = compute_dtype
        if dropped_x is not None:
            base_of_dropped = F.linear(dropped_x, weight.to(dropped_x.dtype))
        weight_times_a = F.linear(_as_fp32(a_weight), weight).T
        if want_weight_sq:
            weight_sq = weight.pow(2).sum(dim=1)
        ctx.mark_non_differentiable(weight_times_a, weight_sq)
        return result, base_of_dropped, weight_times_a, weight_sq

    @staticmethod
    def backward(ctx, grad_result, grad_of_dropped, _grad_wat, _grad_wsq):
        grad_x = grad_dropped = None
        needs_x, needs_dropped = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        if not (needs_x or needs_dropped):
            return None, None, None, None, None
        weight = _dequantize_fp32(ctx.base_layer)
        if needs_x and grad_result is not None:
            compute_dtype = ctx.compute_dtype
            grad_x = (grad_result.to(compute_dtype) @ weight.to(compute_dtype)).to(ctx.x_dtype)
        if needs_dropped and grad_of_dropped is not None:
            grad_dropped = grad_of_dropped @ weight.to(ctx.dropped_dtype)
        return grad_x, grad_dropped, None, None, None


def _compose(module, adapter: str, result: torch.Tensor, lora_out: torch.Tensor, norm: torch.Tensor):
    """result + (g - 1) ⊙ (result - bias) + g ⊙ s·lora_out, with g = m / norm in fp32."""
    magnitude = module.lora_magnitude_vector[adapter].weight
    bias = module.get_base_layer().bias
    return _DoraComposition.apply(result, lora_out, magnitude, norm, bias, float(module.scaling[adapter]))


def _compose_with_dropout(module, adapter, result, base_of_dropped, lora_out, norm):
    """peft's dropout branch, same expression: result + (g - 1) ⊙ base(dropout(x)) + g ⊙ s·lora(dropout(x))."""
    magnitude = module.lora_magnitude_vector[adapter].weight
    return _DoraDropoutComposition.apply(result, base_of_dropped, lora_out, magnitude, norm,
                                         float(module.scaling[adapter]))


def _dropout_then_down(dropout: nn.Module, lora_A: nn.Module, x: torch.Tensor):
    """(dropout(x), A·dropout(x)) as peft computes them, keeping a bool mask instead of the dropped-out input.

    Op by op, autograd keeps the float mask and a copy of the dropped-out input for every adapted layer (q, k and
    v each draw their own), two [tokens, in] float tensors per layer that a DoRA layer without dropout does not
    keep. Only nn.Dropout outside autocast is fused; anything else runs as peft runs it."""
    # autocast asked about x's own device: without an argument torch answers for CUDA only, and CPU autocast
    # (bf16 training on these machines) would take the fused path the line above promises it does not
    if type(dropout) is not nn.Dropout or type(lora_A) is not nn.Linear or torch.is_autocast_enabled(x.device.type):
        dropped = dropout(x)
        return dropped, lora_A(dropped)
    return _DropoutThenDown.apply(x, lora_A.weight, float(dropout.p))


class _DropoutThenDown(torch.autograd.Function):
    """x_d = dropout(x) and x_d Aᵀ; saves x (which other layers reading the same input share), A and a bool mask,
    and rebuilds x_d in backward for A's gradient.

    The mask is drawn exactly as F.dropout draws it (CPU: a float tensor's bernoulli_, then divided by 1 - p; CUDA:
    the fused native_dropout), so the same seed gives the same masks as peft's forward."""

    @staticmethod
    def forward(ctx, x, a_weight, p):
        if x.device.type == "cuda":
            dropped, keep = torch.native_dropout(x, p, True)
        else:
            noise = torch.empty_like(x).bernoulli_(1 - p).div_(1 - p)
            dropped = x * noise
            keep = noise.bool()  # a cast, several times faster on the CPU than comparing with zero
        ctx.save_for_backward(x, a_weight, keep)
        ctx.p = p
        return dropped, F.linear(dropped, a_weight)

    @staticmethod
    def backward(ctx, grad_dropped, grad_down):
        # The 1/(1 - p) of the kept elements is applied to the small A gradient and folded into one addmm for x's,
        # so that the [tokens, in] work is one masked copy of x and one in-place masking, as op-by-op dropout costs.
        x, a_weight, keep = ctx.saved_tensors
        # Multiplying by the bool mask's bytes viewed as uint8 runs at a float multiply's speed on the CPU; bool
        # operands take a slower path (measured 2-5x for where/mul on [2048, 576]).
        keep = keep.view(torch.uint8)
        kept_scale = 1 / (1 - ctx.p)
        grad_x = grad_a = None
        down_rows = None if grad_down is None else grad_down.reshape(-1, grad_down.shape[-1])
        if down_rows is not None and ctx.needs_input_grad[1]:
            dropped = (x * keep).reshape(down_rows.shape[0], -1)
            grad_a = (down_rows.T @ dropped).mul_(kept_scale).to(a_weight.dtype)
        if ctx.needs_input_grad[0]:
            if down_rows is not None:
                if grad_dropped is None:
                    grad_x = (down_rows @ a_weight).mul_(kept_scale)
                else:
                    grad_x = torch.addmm(grad_dropped.reshape(down_rows.shape[0], -1), down_rows, a_weight,
                                         beta=kept_scale, alpha=kept_scale)
                grad_x = grad_x.reshape(x.shape)
            elif grad_dropped is not None:
                grad_x = grad_dropped * kept_scale
            if grad_x is not None:
                grad_x = grad_x.mul_(keep)
        return grad_x, grad_a, None


class _DoraDropoutComposition(torch.autograd.Function):
    """y = result + (g - 1) ⊙ d + g ⊙ s·l with d = base(x_d) (no bias), l = B A x_d and g = m / norm (fp32).

    Saves z = d + s·l and g, where the op-by-op expression keeps d and l: the magnitude's gradient is
    Σ_t dy_t ⊙ z_t / norm, d's is dy ⊙ (g - 1), l's is dy ⊙ g·s."""

    @staticmethod
    def forward(ctx, result, base_of_dropped, lora_out, magnitude, norm, scaling):
        scale = (_as_fp32(magnitude) / norm).view(1, -1)
        # (g - 1) ⊙ d + g ⊙ s·l = g ⊙ z - d: three passes over the output instead of six. The sum is in float32
        # (scale and z are): result - d first would round it to a 16-bit result's precision.
        combined = torch.add(base_of_dropped, lora_out, alpha=scaling)
        output = torch.addcmul(result, scale, combined).sub_(base_of_dropped)
        ctx.save_for_backward(combined, scale, norm, magnitude)
        ctx.scaling = scaling
        ctx.dtypes = (result.dtype, base_of_dropped.dtype, lora_out.dtype)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        combined, scale, norm, magnitude = ctx.saved_tensors
        result_dtype, dropped_dtype, lora_dtype = ctx.dtypes
        needs = ctx.needs_input_grad
        grad_result = grad_dropped = grad_lora = grad_magnitude = None
        if needs[0]:
            grad_result = grad_output.to(result_dtype)
        if needs[1]:
            grad_dropped = (grad_output * (scale - 1)).to(dropped_dtype)
        if needs[2]:
            grad_lora = (grad_output * scale * ctx.scaling).to(lora_dtype)
        if needs[3]:
            rows = _as_fp32(grad_output.reshape(-1, grad_output.shape[-1]))
            dot = torch.linalg.vecdot(rows, _as_fp32(combined.reshape(rows.shape)), dim=0)
            grad_magnitude = (dot / norm).to(magnitude.dtype)
        return grad_result, grad_dropped, grad_lora, grad_magnitude, None, None


class _DoraComposition(torch.autograd.Function):
    """y = g ⊙ (result - bias + s·lora_out) + bias, g = m / norm (fp32; the norm is a constant), as one operation.

    Saves y, not the base and LoRA outputs. The magnitude's gradient is Σ_t dy_t ⊙ z_t / norm with
    z = (y - bias) / g, i.e. Σ_t dy_t ⊙ (y_t - bias) / m: one product and one reduction over the tokens. (Rows with
    m = 0 would need z itself; peft divides by a zero norm there anyway.) The output is returned in the base
    output's dtype, which is what peft casts the layer's result to anyway. Forward and backward are plain tensor
    functions, each compiled into one fused kernel where `_composition_kernels` says so.
    """

    @staticmethod
    def forward(ctx, result, lora_out, magnitude, norm, bias, scaling):
        forward_kernel, _ = _composition_kernels(result.device)
        output, scale = forward_kernel(result, lora_out, magnitude, norm, bias, scaling)
        ctx.save_for_backward(output, scale, magnitude, bias)
        ctx.scaling = scaling
        ctx.dtypes = (result.dtype, lora_out.dtype)
        return output

    @staticmethod
    def backward(ctx, grad_output):
        output, scale, magnitude, bias = ctx.saved_tensors
        _, backward_kernel = _composition_kernels(grad_output.device)
        grads = backward_kernel(
            grad_output, output, scale, magnitude, bias, ctx.scaling, *ctx.dtypes, ctx.needs_input_grad[:3]
        )
        return (*grads, None, None, None)


def composition_forward(result, lora_out, magnitude, norm, bias, scaling: float):
    """The fused forward: (y, g) with y in the base output's dtype and g = m / norm in fp32."""
    scale = _as_fp32(magnitude) / norm
    without_bias = result if bias is None else result - bias
    output = torch.add(without_bias, lora_out, alpha=scaling).mul_(scale)
    if bias is not None:
        output = output.add_(bias)
    if output.dtype != result.dtype:
        output = output.to(result.dtype)
    return output, scale


def composition_backward(grad_output, output, scale, magnitude, bias, scaling: float, result_dtype, lora_dtype, needs):
    """The fused backward: gradients of the base output, the LoRA output and the magnitude (None where not needed)."""
    grad_result = grad_lora = grad_magnitude = None
    scaled_grad = grad_output * scale
    if needs[0]:
        grad_result = scaled_grad if scaled_grad.dtype == result_dtype else scaled_grad.to(result_dtype)
    if needs[1]:
        grad_lora = scaled_grad * scaling
        grad_lora = grad_lora if grad_lora.dtype == lora_dtype else grad_lora.to(lora_dtype)
    if needs[2]:
        rows = _as_fp32(grad_output.reshape(-1, grad_output.shape[-1]))
        dot = torch.linalg.vecdot(rows, _as_fp32(output.reshape(rows.shape)), dim=0)
        if bias is not None:
            dot = dot - _as_fp32(bias) * rows.sum(dim=0)
        grad_magnitude = dot / _as_fp32(magnitude)
        if grad_magnitude.dtype != magnitude.dtype:
            grad_magnitude = grad_magnitude.to(magnitude.dtype)
    return grad_result, grad_lora, grad_magnitude


_compiled_kernels = None


def _composition_kernels(device: torch.device):
    """(forward, backward) of the composition: compiled on CUDA with Triton (each one fused kernel instead of
    ~8 launches per layer, which is what bounds these layers on a GPU), eager on CPU, where a fused loop gains
    little and compiling costs seconds per shape. FAST_DORA_COMPILE=1 compiles on every device, =0 never."""
    global _compiled_kernels
    if not _compile_on(device):
        return composition_forward, composition_backward
    if _compiled_kernels is None:
        # dynamic: one graph for every token count and layer width instead of one per shape.
        _compiled_kernels = (
            torch.compile(composition_forward, dynamic=True, fullgraph=True),
            torch.compile(composition_backward, dynamic=True, fullgraph=True),
        )
    return _compiled_kernels


def _compile_on(device: torch.device) -> bool:
    choice = os.environ.get(COMPILE_ENV, "auto").strip().lower()
    if choice in ("0", "false", "no", "off"):
        return False
    if choice in ("1", "true", "yes", "on"):
        return True
    if device.type != "cuda":
        return False
    from torch.utils._triton import has_triton

    return has_triton()
