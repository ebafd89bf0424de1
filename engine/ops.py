"""One wrapper per kernel: check inputs, then run the compiled CUDA op or the PyTorch reference.

The references below are the specification of every kernel in csrc/ (the GPU tests compare against
them) and the implementation used on the CPU. Conventions shared by all of them:

- int8 is symmetric: q = clamp(round_half_even(x / scale), -128, 127); dequantized x ~ q * scale.
- Dynamic scales are absmax * (1 / 127) in float32 (a multiplication, which every device rounds the
  same way), so dynamically quantized values lie in [-127, 127].
- A matrix product of int8 operands accumulates exactly in int32; scales and bias are applied
  afterwards in float32 (the GEMM epilogue), then the result is cast to the output dtype.
"""

from __future__ import annotations

import logging
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

logger = logging.getLogger(__name__)

INT8_MAX = 127.0
INV_INT8_MAX = 1.0 / INT8_MAX
# A token (or tensor) that is all zeros would give a zero scale; this floor keeps 0 / scale finite.
MIN_SCALE = 1e-8


class QuantizedActivation(NamedTuple):
    """An int8 activation with its dequantization scale: per token `[M]` or per tensor `[1]`."""

    data: torch.Tensor  # int8 [M, K]
    scale: torch.Tensor  # float32 [M] or [1]
    dtype: torch.dtype  # the floating dtype the activation had (and the consumer's output dtype)


def _load_extension() -> bool:
    """Import the compiled ops (they register themselves as torch.ops.smoothserve.*)."""
    try:
        import engine._C  # noqa: F401
    except ImportError as error:
        if torch.cuda.is_available():
            logger.warning("smoothserve CUDA extension not available (%s): GPU runs use slow PyTorch references", error)
        return False
    return True


EXTENSION_LOADED = _load_extension()


_warned_missing_ops: set[str] = set()


def _cuda_op_or_none(name: str, tensor: torch.Tensor) -> torch._ops.OpOverloadPacket | None:
    """The compiled op for a CUDA tensor; None on the CPU, where the reference is the implementation.

    An op the built extension lacks (an older build, or a kernel not written yet) runs as its reference,
    with one warning per op so a slow GPU path never goes unnoticed.
    """
    if not tensor.is_cuda or not EXTENSION_LOADED:
        return None
    try:
        return getattr(torch.ops.smoothserve, name)
    except (AttributeError, RuntimeError):
        if name not in _warned_missing_ops:
            _warned_missing_ops.add(name)
            logger.warning("smoothserve CUDA extension has no op %r: using the PyTorch reference on the GPU", name)
        return None


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _check_float_2d(x: torch.Tensor, what: str) -> None:
    _check(x.dim() == 2, f"{what} must be 2-D [M, K], got shape {tuple(x.shape)}")
    _check(x.is_floating_point(), f"{what} must be a floating tensor, got {x.dtype}")


# --------------------------------------------------------------------------------------------------
# Quantization of activations


def _round_to_int8(x_over_scale: torch.Tensor) -> torch.Tensor:
    # torch.round rounds half to even, like cvt.rni in CUDA.
    return torch.round(x_over_scale).clamp_(-128.0, INT8_MAX).to(torch.int8)


def quantize_per_token_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    scale = (xf.abs().amax(dim=-1) * INV_INT8_MAX).clamp_(min=MIN_SCALE)
    return _round_to_int8(xf / scale[:, None]), scale


def quantize_per_tensor_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    scale = (xf.abs().amax() * INV_INT8_MAX).clamp_(min=MIN_SCALE).reshape(1)
    return _round_to_int8(xf / scale), scale


def quantize_static_reference(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return _round_to_int8(x.float() / scale.float())


def quantize_per_token(x: torch.Tensor) -> QuantizedActivation:
    """Per-token dynamic quantization (SmoothQuant O1): one scale per row."""
    _check_float_2d(x, "quantize_per_token input")
    op = _cuda_op_or_none("quantize_per_token", x)
    q, scale = op(x) if op is not None else quantize_per_token_reference(x)
    return QuantizedActivation(q, scale, x.dtype)


def quantize_per_tensor(x: torch.Tensor) -> QuantizedActivation:
    """Per-tensor dynamic quantization (SmoothQuant O2): one scale for the whole batch."""
    _check_float_2d(x, "quantize_per_tensor input")
    op = _cuda_op_or_none("quantize_per_tensor", x)
    q, scale = op(x) if op is not None else quantize_per_tensor_reference(x)
    return QuantizedActivation(q, scale, x.dtype)


def quantize_static(x: torch.Tensor, scale: torch.Tensor) -> QuantizedActivation:
    """Per-tensor static quantization (SmoothQuant O3): the scale comes from calibration."""
    _check_float_2d(x, "quantize_static input")
    _check(scale.numel() == 1 and scale.dtype == torch.float32, "static scale must be a float32 tensor of 1 element")
    op = _cuda_op_or_none("quantize_static", x)
    q = op(x, scale) if op is not None else quantize_static_reference(x, scale)
    return QuantizedActivation(q, scale.reshape(1), x.dtype)


def quantize_activation(x: torch.Tensor, mode: str, static_scale: torch.Tensor | None = None) -> QuantizedActivation:
    """Quantize `x` [M, K] as the level asks: per_token | per_tensor_dynamic | per_tensor_static."""
    if mode == "per_token":
        return quantize_per_token(x)
    if mode == "per_tensor_dynamic":
        return quantize_per_tensor(x)
    if mode == "per_tensor_static":
        _check(static_scale is not None, "per_tensor_static quantization needs a calibrated scale")
        return quantize_static(x, static_scale)
    raise ValueError(f"unknown activation quantization mode {mode!r}")


# --------------------------------------------------------------------------------------------------
# LayerNorm followed by quantization (the LayerNorm in front of q/k/v and fc1)


def _check_norm_mode(mode: str, static_scale: torch.Tensor | None) -> None:
    _check(mode in ("per_token", "per_tensor_dynamic", "per_tensor_static"), f"unknown mode {mode!r}")
    _check(mode != "per_tensor_static" or static_scale is not None, "static mode needs a calibrated scale")


def layernorm_quant_reference(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    mode: str,
    static_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    # The fused kernel keeps the normalized values in float32 registers: no rounding to fp16 between.
    w = weight.float() if weight is not None else None
    b = bias.float() if bias is not None else None
    normed = F.layer_norm(x.float(), (x.shape[-1],), w, b, eps)
    if mode == "per_token":
        return quantize_per_token_reference(normed)
    if mode == "per_tensor_dynamic":
        return quantize_per_tensor_reference(normed)
    assert static_scale is not None
    return quantize_static_reference(normed, static_scale), static_scale.reshape(1)


def layernorm_quant(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    mode: str,
    static_scale: torch.Tensor | None = None,
) -> QuantizedActivation:
    """LayerNorm over the last dimension, then int8 quantization, in one pass."""
    _check_float_2d(x, "layernorm_quant input")
    _check_norm_mode(mode, static_scale)
    op = _cuda_op_or_none("layernorm_quant", x)
    if op is not None:
        q, scale = op(x, weight, bias, eps, mode, static_scale)
    else:
        q, scale = layernorm_quant_reference(x, weight, bias, eps, mode, static_scale)
    return QuantizedActivation(q, scale, x.dtype)


def add_layernorm_quant_reference(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    mode: str,
    static_scale: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # The sum is rounded to the activation dtype (it is the new residual stream) and normalized as rounded,
    # exactly as the unfused `residual + x` followed by the LayerNorm.
    summed = (x.float() + residual.float()).to(x.dtype)
    q, scale = layernorm_quant_reference(summed, weight, bias, eps, mode, static_scale)
    return q, scale, summed


def add_layernorm_quant(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    mode: str,
    static_scale: torch.Tensor | None = None,
) -> tuple[QuantizedActivation, torch.Tensor]:
    """Residual add, LayerNorm and int8 quantization in one pass: returns (quantized LN(x + residual), x + residual)."""
    _check_float_2d(x, "add_layernorm_quant input")
    _check(residual.shape == x.shape and residual.dtype == x.dtype, "residual must match x in shape and dtype")
    _check_norm_mode(mode, static_scale)
    op = _cuda_op_or_none("add_layernorm_quant", x)
    if op is not None:
        q, scale, summed = op(x, residual, weight, bias, eps, mode, static_scale)
    else:
        q, scale, summed = add_layernorm_quant_reference(x, residual, weight, bias, eps, mode, static_scale)
    return QuantizedActivation(q, scale, x.dtype), summed


# --------------------------------------------------------------------------------------------------
# The W8A8 GEMM


def int8_matmul_float64(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a int8 [M, K] @ w int8 [N, K]^T -> int32 [M, N] through float64, which is exact here: every
    product and partial sum is an integer of magnitude <= K * 128 * 128, far below 2**53 for any
    K < 2**39, so no step rounds whatever the summation order."""
    return (a.double() @ w.double().t()).to(torch.int32)


def int8_matmul_exact(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """a int8 [M, K] @ w int8 [N, K]^T -> int32 [M, N], exactly (int32 accumulation on the CPU)."""
    if a.device.type == "cpu":
        return torch._int_mm(a, w.t().contiguous())
    return int8_matmul_float64(a, w)


def _check_gemm_operands(
    name: str, a: torch.Tensor, w: torch.Tensor, a_scale: torch.Tensor, w_scale: torch.Tensor
) -> int:
    """The checks every W8A8 GEMM shares (operands, scales, the kernels' multiples of 16); returns N."""
    _check(a.dtype == torch.int8 and w.dtype == torch.int8, f"{name} needs int8 operands, got {a.dtype}, {w.dtype}")
    _check(a.dim() == 2 and w.dim() == 2, f"{name} operands must be 2-D")
    m, k = a.shape
    n = w.shape[0]
    _check(w.shape[1] == k, f"{name} K mismatch: a is {tuple(a.shape)}, w is {tuple(w.shape)}")
    _check(a_scale.dtype == torch.float32 and a_scale.numel() in (1, m), f"a_scale must be float32 [{m}] or [1]")
    _check(w_scale.dtype == torch.float32 and w_scale.numel() in (1, n), f"w_scale must be float32 [{n}] or [1]")
    _check(k % 16 == 0 and n % 16 == 0, f"{name} needs K and N to be multiples of 16, got K={k}, N={n}")
    return n


def w8a8_gemm_reference(
    a: torch.Tensor,
    w: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    relu: bool,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    acc = int8_matmul_exact(a, w).float()
    out = acc * a_scale.float().reshape(-1, 1) * w_scale.float().reshape(1, -1)
    if bias is not None:
        out = out + bias.float()
    if relu:
        out = out.clamp_(min=0.0)
    return out.to(out_dtype)


def w8a8_gemm(
    a: torch.Tensor,
    w: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
    relu: bool = False,
    out_dtype: torch.dtype = torch.float16,
) -> torch.Tensor:
    """out[m, n] = a_scale[m] * w_scale[n] * sum_k a[m, k] * w[n, k] + bias[n], optionally ReLU'd.

    a: int8 [M, K] row-major; w: int8 [N, K] (K-major, as nn.Linear stores weights);
    a_scale: float32 [M] (per token) or [1]; w_scale: float32 [N] (per channel) or [1].
    """
    n = _check_gemm_operands("w8a8_gemm", a, w, a_scale, w_scale)
    _check(bias is None or bias.numel() == n, f"bias must have {n} elements")
    _check(out_dtype in (torch.float16, torch.bfloat16, torch.float32), f"unsupported output dtype {out_dtype}")
    op = _cuda_op_or_none("w8a8_gemm", a)
    if op is not None:
        _check(out_dtype != torch.float32, "the CUDA W8A8 GEMM writes float16 or bfloat16; run W8A8 models in those")
        if bias is not None and bias.dtype != out_dtype:
            bias = bias.to(out_dtype)
        return op(a, w, a_scale.contiguous(), w_scale.contiguous(), bias, relu, out_dtype)
    return w8a8_gemm_reference(a, w, a_scale, w_scale, bias, relu, out_dtype)


def fma_float32(a: torch.Tensor, b: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """a * b + c of float32 tensors (broadcast), rounded once to float32, as CUDA's __fmaf_rn.

    a * b is exact in float64 (24 + 24 significant bits <= 53). Its sum with c is computed in float64
    with rounding to odd (the nearest float64, moved one ulp toward the exact sum when that was inexact
    and the last bit is even; TwoSum gives the exact rounding error), and a value rounded to odd with at
    least two more bits than float32 rounds to float32 exactly as the exact sum would. So the result is
    the correctly rounded fma, free of the double rounding of a plain float64 computation.
    """
    product = a.double() * b.double()
    addend = c.double()
    total = product + addend
    product_part = total - addend  # TwoSum: total + error == product + addend, exactly
    addend_part = total - product_part
    error = (product - product_part) + (addend - addend_part)
    even_and_inexact = (error != 0) & ((total.view(torch.int64) & 1) == 0)
    toward_exact = torch.full_like(total, float("inf")).copysign_(error)
    return torch.where(even_and_inexact, torch.nextafter(total, toward_exact), total).float()


def w8a8_gemm_int8_out_reference(
    a: torch.Tensor,
    w: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    relu: bool,
    out_scale: torch.Tensor,
) -> torch.Tensor:
    """The int8-output GEMM bit for bit: float32 operations in the kernels' order (csrc/gemm/w8a8_epilogue.cuh).

        t = w_scale[n] * float32(acc)              (int32 -> float32 rounds to nearest even)
        y = fma(a_scale[m], t, bias[n] or 0)       (one rounding)
        y = max(y, 0) if relu
        q = clamp(round_half_even(y / out_scale), -128, 127)   (correctly rounded float32 division)

    (w8a8_gemm_reference rounds differently, (acc * a_scale) * w_scale + bias in three steps: its fp16 /
    bf16 outputs are compared with a tolerance, an int8 output must match exactly.)
    """
    acc = int8_matmul_exact(a, w).float()
    scaled_acc = w_scale.float().reshape(1, -1) * acc
    addend = bias.float().reshape(1, -1) if bias is not None else torch.zeros((1, 1), device=acc.device)
    y = fma_float32(a_scale.float().reshape(-1, 1), scaled_acc, addend)
    if relu:
        y = y.clamp_(min=0.0)
    return _round_to_int8(y / out_scale.float().reshape(1, 1))


def w8a8_gemm_int8_out(
    a: torch.Tensor,
    w: torch.Tensor,
    a_scale: torch.Tensor,
    w_scale: torch.Tensor,
    bias: torch.Tensor | None,
    relu: bool,
    out_scale: torch.Tensor,
) -> torch.Tensor:
    """int8 [M, N] = clamp(round_half_even(y / out_scale), -128, 127), y = w8a8_gemm's value in float32.

    For static (O3) activation scales: fc1's output is requantized for fc2 in the GEMM's epilogue instead
    of being written in fp16 and quantized again. Operands as w8a8_gemm; bias float16 / bfloat16 [N]
    (added in float32), out_scale float32 [1] (the next layer's static activation scale).
    """
    name = "w8a8_gemm_int8_out"
    n = _check_gemm_operands(name, a, w, a_scale, w_scale)
    # The kernels take a bias of their activation dtype; float32 models exist on the CPU only.
    bias_dtypes = (torch.float16, torch.bfloat16) if a.is_cuda else (torch.float16, torch.bfloat16, torch.float32)
    _check(bias is None or (bias.numel() == n and bias.dtype in bias_dtypes),
           f"{name}: bias must be float16 or bfloat16 (float32 on the CPU) with {n} elements")  # fmt: skip
    _check(out_scale.dtype == torch.float32 and out_scale.numel() == 1, f"{name}: out_scale must be float32 [1]")
    op = _cuda_op_or_none(name, a)
    if op is not None:
        return op(a, w, a_scale.contiguous(), w_scale.contiguous(), bias, relu, out_scale.reshape(1))
    return w8a8_gemm_int8_out_reference(a, w, a_scale, w_scale, bias, relu, out_scale)


# --------------------------------------------------------------------------------------------------
# Paged KV cache: caches are [num_blocks, block_size, num_heads, head_dim]; slot = block * block_size + offset.
# An int8 cache holds each (token, head) row quantized symmetrically by its own float32 scale (absmax / 127,
# rounded as quantize_per_token rounds a row); the scales are [num_blocks, block_size, num_heads].


def quantize_kv_reference(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows [T, H, D] -> (int8 [T, H, D], float32 scales [T, H]): one scale per (token, head)."""
    q, scale = quantize_per_token_reference(x.reshape(-1, x.shape[-1]))
    return q.view(x.shape), scale.view(x.shape[:-1])


def dequantize_kv(rows: torch.Tensor, scales: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """Cache rows [..., H, D] as `dtype`: int8 rows times their scales [..., H]; other rows as they are."""
    if scales is None:
        return rows.to(dtype)
    return (rows.float() * scales[..., None]).to(dtype)


def gather_kv(
    cache: torch.Tensor, scales: torch.Tensor | None, blocks: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    """The rows of the cache blocks `blocks` [..., W] laid end to end, [..., W * block_size, H, D], as `dtype`
    (an int8 cache's rows dequantized by their scales)."""
    blocks = blocks.long()
    dim = blocks.dim() - 1  # the block axis, merged with the block's token axis
    rows = cache[blocks].flatten(dim, dim + 1)
    return dequantize_kv(rows, None if scales is None else scales[blocks].flatten(dim, dim + 1), dtype)


def _check_kv_scales(name: str, key_cache: torch.Tensor, key_scales: torch.Tensor | None,
                     value_scales: torch.Tensor | None) -> None:  # fmt: skip
    quantized = key_cache.dtype == torch.int8
    _check(quantized == (key_scales is not None and value_scales is not None),
           f"{name}: an int8 cache needs key and value scales, and only an int8 cache takes them")  # fmt: skip


def write_kv_cache(
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    slots: torch.Tensor,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
) -> None:
    """Store the new tokens' keys and values [T, H, D] at their cache slots [T]; a slot < 0 writes nothing.
    An int8 cache (with its scales) stores them quantized per (token, head)."""
    _check(key.shape == value.shape and key.shape[0] == slots.shape[0], "write_kv_cache: key, value, slots mismatch")
    _check_kv_scales("write_kv_cache", key_cache, key_scales, value_scales)
    quantized = key_scales is not None
    op = _cuda_op_or_none("write_kv_cache_int8" if quantized else "write_kv_cache", key)
    if op is not None:
        if quantized:
            op(key, value, key_cache, value_cache, key_scales, value_scales, slots)
        else:
            op(key, value, key_cache, value_cache, slots)
        return
    keep = slots >= 0
    rows = slots[keep]
    for new, cache, scales in ((key, key_cache, key_scales), (value, value_cache, value_scales)):
        if scales is None:
            cache.view(-1, *new.shape[1:])[rows] = new[keep].to(cache.dtype)
        else:
            q, s = quantize_kv_reference(new[keep])
            cache.view(-1, *new.shape[1:])[rows] = q
            scales.view(-1, new.shape[1])[rows] = s


def paged_attention_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_lens: tuple[int, ...],
    context_lens: tuple[int, ...],
    scale: float,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """The specification of attention over the paged cache: sequence i's query_lens[i] new tokens [T, H, D],
    already written to the cache after its context_lens[i] cached ones, attend causally to all of them."""
    block_size = key_cache.shape[1]
    outputs, start = [], 0
    for index, (new, context) in enumerate(zip(query_lens, context_lens, strict=True)):
        total = context + new
        blocks = block_tables[index, : -(-total // block_size)]
        keys = gather_kv(key_cache, key_scales, blocks, torch.float32)[:total].transpose(0, 1)  # [H, total, D]
        values = gather_kv(value_cache, value_scales, blocks, torch.float32)[:total].transpose(0, 1)
        q = query[start : start + new].transpose(0, 1)  # [H, new, D]
        # Query i sits at position context + i and sees keys 0 .. context + i.
        visible = (
            torch.arange(total, device=q.device)[None, :] <= (context + torch.arange(new, device=q.device))[:, None]
        )
        out = F.scaled_dot_product_attention(q.float(), keys, values, attn_mask=visible, scale=scale).to(q.dtype)
        outputs.append(out.transpose(0, 1))
        start += new
    return torch.cat(outputs)


def paged_attention_decode_reference(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """One new token per sequence [B, H, D] over its seq_lens[b] cached tokens (its own included), in
    float32; a sequence of length 0 (a padding row) gets zeros."""
    keys = gather_kv(key_cache, key_scales, block_tables, torch.float32)  # [B, W * block_size, H, D]
    values = gather_kv(value_cache, value_scales, block_tables, torch.float32)
    scores = torch.einsum("bhd,bthd->bht", query.float(), keys) * scale
    visible = torch.arange(keys.shape[1], device=query.device)[None, :] < seq_lens.to(query.device)[:, None].long()
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # all -inf (length 0) -> zeros
    return torch.einsum("bht,bthd->bhd", probs, values).to(query.dtype)


_DECODE_KERNEL_DTYPES = (torch.float16, torch.bfloat16)
_DECODE_KERNEL_HEAD_DIMS = (32, 64, 80, 96, 128, 256)


def decode_kernel_supports(dtype: torch.dtype, head_dim: int) -> bool:
    """Whether the CUDA decode kernel takes this dtype and head dim (`paged_attention_decode` refuses the rest)."""
    return dtype in _DECODE_KERNEL_DTYPES and head_dim in _DECODE_KERNEL_HEAD_DIMS


def paged_attention_decode(
    query: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention: query [B, H, D] (rows may be strided), block_tables int32 [B, W], seq_lens int32 [B];
    an int8 cache comes with its scales [num_blocks, block_size, H].

    The CUDA kernel's launch depends only on shapes, never on the lengths' values, so it is safe inside
    a CUDA graph.
    """
    _check(query.dim() == 3 and block_tables.shape[0] == query.shape[0] == seq_lens.shape[0],
           "paged_attention_decode: query [B, H, D], block_tables [B, W] and seq_lens [B] disagree")  # fmt: skip
    _check_kv_scales("paged_attention_decode", key_cache, key_scales, value_scales)
    op = _cuda_op_or_none("paged_attention_decode", query)
    if op is not None:
        name = "paged_attention_decode"
        _check(query.dtype in _DECODE_KERNEL_DTYPES,
               f"{name}: the CUDA kernel takes float16 or bfloat16, not {query.dtype}")  # fmt: skip
        _check(query.shape[2] in _DECODE_KERNEL_HEAD_DIMS,
               f"{name}: head_dim {query.shape[2]} is not one of {_DECODE_KERNEL_HEAD_DIMS}")  # fmt: skip
        return op(query, key_cache, value_cache, block_tables, seq_lens, scale, key_scales, value_scales)
    return paged_attention_decode_reference(
        query, key_cache, value_cache, block_tables, seq_lens, scale, key_scales, value_scales
    )


def prefill_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    key_cache: torch.Tensor,
    value_cache: torch.Tensor,
    block_table: torch.Tensor,
    context_len: int,
    scale: float,
    key_scales: torch.Tensor | None = None,
    value_scales: torch.Tensor | None = None,
) -> torch.Tensor:
    """One sequence's chunk of new tokens [n, H, D] attending causally to its context_len cached tokens
    and to itself. Without context it runs on the new keys directly (FlashAttention on a GPU); with
    context, the cached prefix is gathered from the blocks (where the new keys were already written;
    an int8 cache is dequantized by its scales)."""
    new = query.shape[0]
    # SDPA's fused kernels (FlashAttention, memory-efficient) take 4-D [batch, heads, tokens, dim] only;
    # 3-D input falls back to the math path, which materializes the [H, n, total] score matrix.
    q = query.transpose(0, 1)[None]  # [1, H, n, D]
    if context_len == 0:
        out = F.scaled_dot_product_attention(
            q, key.transpose(0, 1)[None], value.transpose(0, 1)[None], is_causal=True, scale=scale
        )
        return out[0].transpose(0, 1)
    total = context_len + new
    block_size = key_cache.shape[1]
    blocks = block_table[: -(-total // block_size)]
    keys = gather_kv(key_cache, key_scales, blocks, q.dtype)[:total].transpose(0, 1)[None]  # [1, H, total, D]
    values = gather_kv(value_cache, value_scales, blocks, q.dtype)[:total].transpose(0, 1)[None]
    # Query i sits at position context_len + i: the causal mask aligned to the lower right.
    mask = causal_lower_right(new, total)
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)
    return out[0].transpose(0, 1)


# --------------------------------------------------------------------------------------------------
# Weights


def quantize_weight(weight: torch.Tensor, granularity: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 weight quantization: per output channel (`[N]` scales) or per tensor (`[1]`)."""
    wf = weight.float()
    if granularity == "per_channel":
        scale = (wf.abs().amax(dim=1) * INV_INT8_MAX).clamp_(min=MIN_SCALE)
        return _round_to_int8(wf / scale[:, None]), scale
    if granularity == "per_tensor":
        scale = (wf.abs().amax() * INV_INT8_MAX).clamp_(min=MIN_SCALE).reshape(1)
        return _round_to_int8(wf / scale), scale
    raise ValueError(f"unknown weight granularity {granularity!r}")


# --------------------------------------------------------------------------------------------------
# Shapes of the compiled ops for tracing (torch.compile, meta tensors)

if EXTENSION_LOADED:

    @torch.library.register_fake("smoothserve::w8a8_gemm")
    def _w8a8_gemm_fake(a, w, a_scale, w_scale, bias, relu, out_dtype):
        return a.new_empty((a.shape[0], w.shape[0]), dtype=out_dtype)

    def _has_op(name: str) -> bool:
        try:
            getattr(torch.ops.smoothserve, name)
        except (AttributeError, RuntimeError):
            return False
        return True

    if _has_op("w8a8_gemm_int8_out"):  # absent from extensions built before the op

        @torch.library.register_fake("smoothserve::w8a8_gemm_int8_out")
        def _w8a8_gemm_int8_out_fake(a, w, a_scale, w_scale, bias, relu, out_scale):
            return a.new_empty((a.shape[0], w.shape[0]), dtype=torch.int8)

    @torch.library.register_fake("smoothserve::quantize_per_token")
    def _quantize_per_token_fake(x):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((x.shape[0],), dtype=torch.float32)

    @torch.library.register_fake("smoothserve::quantize_per_tensor")
    def _quantize_per_tensor_fake(x):
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((1,), dtype=torch.float32)

    @torch.library.register_fake("smoothserve::quantize_static")
    def _quantize_static_fake(x, scale):
        return x.new_empty(x.shape, dtype=torch.int8)

    @torch.library.register_fake("smoothserve::add_layernorm_quant")
    def _add_layernorm_quant_fake(x, residual, weight, bias, eps, mode, static_scale):
        rows = x.shape[0] if mode == "per_token" else 1
        return (x.new_empty(x.shape, dtype=torch.int8), x.new_empty((rows,), dtype=torch.float32),
                x.new_empty(x.shape))  # fmt: skip

    @torch.library.register_fake("smoothserve::write_kv_cache")
    def _write_kv_cache_fake(key, value, key_cache, value_cache, slots):
        return None

    if _has_op("write_kv_cache_int8"):

        @torch.library.register_fake("smoothserve::write_kv_cache_int8")
        def _write_kv_cache_int8_fake(key, value, key_cache, value_cache, key_scales, value_scales, slots):
            return None

    @torch.library.register_fake("smoothserve::paged_attention_decode")
    def _paged_attention_decode_fake(query, key_cache, value_cache, block_tables, seq_lens, scale,
                                     key_scales=None, value_scales=None):  # fmt: skip
        return query.new_empty(query.shape)

    @torch.library.register_fake("smoothserve::layernorm_quant")
    def _layernorm_quant_fake(x, weight, bias, eps, mode, static_scale):
        rows = x.shape[0] if mode == "per_token" else 1
        return x.new_empty(x.shape, dtype=torch.int8), x.new_empty((rows,), dtype=torch.float32)
