"""NF4Linear: a frozen linear layer stored in 4-bit NormalFloat (QLoRA), bit-exact with bitsandbytes.

Dettmers et al., 2023, "QLoRA: Efficient Finetuning of Quantized LLMs", section 3:
``y = x W^T + b`` with ``W`` decoded from blocks of ``B`` elements, ``w_i ~= NF4[q_i] * c_j``
(in fp32, then cast), where the block scale ``c_j`` is itself double-quantized (paper eq. 6):
``c_j ~= DYN8[q8_j] * c2_{j // 256} + offset``.

The format (codebooks, ``quantize_nf4``, ``dequantize_nf4``, ``NF4State``, ...) is
``peftcore.nf4_format``, re-exported here; this module holds the layer and its autograd function.
The guide, with bitsandbytes' CPU and CUDA rounding and the edge cases: docs/nf4.md.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from peftcore.config import NF4Config
from peftcore.nf4_format import (
    DEQUANTIZE_BACKENDS,
    DOUBLE_QUANT_BLOCKSIZE,
    DYNAMIC_MAP_8BIT,
    LUT_SLOTS,
    NF4_CODES,
    QUANTIZABLE_DTYPES,
    TABLES,
    NF4State,
    dequantize_absmax,
    dequantize_dynamic8,
    dequantize_nf4,
    dynamic_map_8bit,
    nearest_dynamic8_code,
    quantize_dynamic8,
    quantize_nf4,
    reciprocal_of_absmax,
    table,
    triton_available,
)
from peftcore.weights import dense_weight, in_features, out_features

__all__ = [
    # the layer
    "NF4Linear",
    "QuantizedWeight",
    # the format, from peftcore.nf4_format
    "DEQUANTIZE_BACKENDS",
    "DOUBLE_QUANT_BLOCKSIZE",
    "DYNAMIC_MAP_8BIT",
    "LUT_SLOTS",
    "NF4_CODES",
    "QUANTIZABLE_DTYPES",
    "TABLES",
    "NF4State",
    "dequantize_absmax",
    "dequantize_dynamic8",
    "dequantize_nf4",
    "dynamic_map_8bit",
    "nearest_dynamic8_code",
    "quantize_dynamic8",
    "quantize_nf4",
    "reciprocal_of_absmax",
    "table",
    "triton_available",
]


class _DequantizingLinear(torch.autograd.Function):
    """``y = x W^T + b`` with ``W`` dequantized in forward and again in backward (as bitsandbytes'
    ``MatMul4Bit`` does). Autograd would otherwise keep each layer's dequantized weight alive from
    forward to backward: for t5-base in bf16 that is 340 MB of frozen copies, on top of the 4-bit
    weights QLoRA exists to keep small. The weight and bias are frozen: no gradient for them."""

    @staticmethod
    def forward(ctx, x: Tensor, layer: NF4Linear, bias: Tensor | None) -> Tensor:
        ctx.layer = layer
        return F.linear(x, layer.dequantize(), bias)

    @staticmethod
    def backward(ctx, grad_output: Tensor) -> tuple[Tensor | None, None, None]:
        if not ctx.needs_input_grad[0]:
            return None, None, None
        return grad_output @ ctx.layer.dequantize().to(grad_output.dtype), None, None


@dataclass(frozen=True)
class QuantizedWeight:
    """A quantized layer's weight as model code sees it: ``shape`` (out, in), ``dtype`` (the dtype
    the layer computes in) and ``device``. Not a tensor: code that would cast its input to a
    linear layer's weight dtype (T5's ``isinstance(wo.weight, torch.Tensor)`` check) leaves the
    input alone, and the layer casts it itself."""

    shape: tuple[int, int]
    dtype: torch.dtype
    device: torch.device


class NF4Linear(nn.Module):
    """A frozen linear layer stored in NF4: ``y = x W^T + b`` with ``W = dequant(NF4 state)``.

    The packed weight and its quantization state are buffers (``weight_packed``, ``absmax`` and,
    with double quantization, ``absmax2`` and ``absmax_offset``), so ``state_dict()`` carries them
    and a parameter+buffer count sees the real bytes; for FSDP the uint8 ones become frozen
    parameters (:meth:`hold_storage_as_parameters`). ``weight`` answers what model code reads
    from a linear layer (its ``shape``, ``dtype``: the compute dtype, ``device``) as a
    :class:`QuantizedWeight`, which is no tensor (so T5's feed-forward does not cast its input to
    it); the values are :meth:`dequantize`'s. The forward pass runs in ``compute_dtype`` and returns
    in the input's dtype (as bitsandbytes' ``Linear4bit``); the weight and bias never get gradients.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        config: NF4Config | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        config = config or NF4Config()
        self.in_features = in_features
        self.out_features = out_features
        self.blocksize = config.blocksize
        self.double_quant = config.double_quant
        self.compute_dtype = config.compute_dtype
        n = in_features * out_features
        blocks = -(-n // self.blocksize)
        self.register_buffer("weight_packed", torch.zeros((n + 1) // 2, dtype=torch.uint8, device=device))
        if self.double_quant:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.uint8, device=device))
            groups = -(-blocks // DOUBLE_QUANT_BLOCKSIZE)
            self.register_buffer("absmax2", torch.zeros(groups, dtype=torch.float32, device=device))
            self.register_buffer("absmax_offset", torch.zeros((), dtype=torch.float32, device=device))
        else:
            self.register_buffer("absmax", torch.zeros(blocks, dtype=torch.float32, device=device))
            self.absmax2 = self.absmax_offset = None
        self.bias = (
            nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None
        )

    @classmethod
    def from_linear(cls, linear: nn.Module, config: NF4Config) -> NF4Linear:
        """Quantize ``linear``'s weight; the bias is copied, frozen, in its own dtype. ``linear`` is an
        ``nn.Linear`` or a transformers ``Conv1D``, whose (in, out) weight is quantized transposed,
        as (out, in), as transformers does when it loads GPT-2 in 4 bit (Conv1D becomes Linear4bit):
        the layer computes ``x W + b`` as the Conv1D did."""
        weight = dense_weight(linear, linear.weight.dtype).detach()  # (out, in), read through the seam
        layer = cls(
            in_features(linear), out_features(linear), linear.bias is not None, config, device=weight.device
        )
        layer.set_weight_(weight)
        if linear.bias is not None:
            layer.bias = nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        return layer

    def quant_state(self) -> NF4State:
        """The quantized weight as an :class:`NF4State` (sharing this layer's buffers)."""
        return NF4State(
            self.weight_packed,
            self.absmax,
            torch.Size((self.out_features, self.in_features)),
            self.compute_dtype,
            self.blocksize,
            self.absmax2,
            self.absmax_offset,
        )

    @property
    def weight(self) -> QuantizedWeight:
        """What model code reads from a linear layer's weight; the values are ``dequantize()``'s."""
        return QuantizedWeight(
            (self.out_features, self.in_features), self.compute_dtype, self.weight_packed.device
        )

    def dequantize(self, dtype: torch.dtype | None = None) -> Tensor:
        """The (out_features, in_features) weight, in ``compute_dtype`` unless ``dtype`` is given."""
        return dequantize_nf4(self.quant_state(), dtype or self.compute_dtype)

    @torch.no_grad()
    def set_weight_(self, weight: Tensor) -> None:
        """Re-quantize a new full-precision weight into this layer's buffers, in place (lossy)."""
        expected = (self.out_features, self.in_features)
        if tuple(weight.shape) != expected:
            raise ValueError(
                f"NF4Linear.set_weight_: weight of shape {tuple(weight.shape)}, expected {expected}"
            )
        state = quantize_nf4(weight.to(self.weight_packed.device), self.blocksize, self.double_quant)
        self.weight_packed.copy_(state.packed)
        self.absmax.copy_(state.absmax)
        if self.double_quant:
            self.absmax2.copy_(state.absmax2)
            self.absmax_offset.copy_(state.offset)

    def hold_storage_as_parameters(self) -> None:
        """Hold the uint8 storage (packed weight; with double quantization the 8-bit scales) as
        frozen parameters instead of buffers, so that FSDP shards it (it replicates buffers; see
        peftcore.sharding). Names, values and ``state_dict()`` stay as they were."""
        for name in ("weight_packed", "absmax"):
            tensor = self._buffers.get(name)
            if tensor is not None and tensor.dtype == torch.uint8:
                del self._buffers[name]
                self.register_parameter(name, nn.Parameter(tensor, requires_grad=False))

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(self.compute_dtype)
        return _DequantizingLinear.apply(x.to(self.compute_dtype), self, bias).to(x.dtype)

    def _apply(self, fn, recurse=True):
        # Module.to(dtype), .half() and Lightning's "bf16-true" cast every floating buffer; the fp32
        # scales must stay exact (bitsandbytes keeps its quantization state out of such casts too).
        # They pass through as int32 bit patterns, which device moves copy and dtype casts skip.
        floats = [name for name, b in self._buffers.items() if b is not None and b.dtype == torch.float32]
        for name in floats:
            self._buffers[name] = self._buffers[name].view(torch.int32)
        try:
            return super()._apply(fn, recurse)
        finally:
            for name in floats:
                self._buffers[name] = self._buffers[name].view(torch.float32)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"blocksize={self.blocksize}, double_quant={self.double_quant}, compute_dtype={self.compute_dtype}"
        )

    # The layout travels in the state dict as a small int64 tensor so that a state dict of another
    # layout is refused instead of silently misread: a (128, 32) and a (64, 64) weight have buffers
    # of identical sizes.
    def _layout(self) -> dict[str, int]:
        return dict(
            out_features=self.out_features,
            in_features=self.in_features,
            blocksize=self.blocksize,
            double_quant=int(self.double_quant),
        )

    def get_extra_state(self) -> Tensor:
        return torch.tensor(list(self._layout().values()))

    def set_extra_state(self, state: Tensor) -> None:
        pass  # checked in _load_from_state_dict; the layout itself is fixed at construction

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # Check everything before anything is copied, so that a refused load leaves the layer unchanged.
        where = f"NF4Linear '{prefix.rstrip('.')}'" if prefix else "NF4Linear"
        fix = "build the NF4Linear with the saved shape and NF4Config"
        saved = state_dict.get(prefix + "_extra_state")
        if saved is not None:
            given = dict(zip(self._layout(), torch.as_tensor(saved).tolist()))
            if given != self._layout():
                raise ValueError(
                    f"{where}: the state dict holds a layer with {given}, this one has {self._layout()}; {fix}"
                )
        for name, tensor in [*self._buffers.items(), *self._parameters.items()]:
            given = state_dict.get(prefix + name)
            if tensor is None or given is None:
                continue
            # The storage must match exactly (a float absmax is not a uint8 one); the bias may change dtype.
            if given.shape != tensor.shape or (name != "bias" and given.dtype != tensor.dtype):
                raise ValueError(
                    f"{where}: '{name}' in the state dict has shape {tuple(given.shape)} and dtype {given.dtype}, "
                    f"expected shape {tuple(tensor.shape)} and dtype {tensor.dtype} (this layer has "
                    f"{self._layout()}); {fix}"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
