"""The compiled CUDA ops against their PyTorch references (engine/ops.py), on fresh random inputs.

Run on a GPU machine after building the extension; skipped elsewhere.
"""

from __future__ import annotations

import pytest
import torch

from engine import ops

pytestmark = pytest.mark.gpu

CUDA = torch.device("cuda")
M_SWEEP = [1, 7, 16, 33, 64, 100, 128, 257, 512, 2048, 8192]
# (N, K) of OPT layers: qkv fused 3h x h, out_proj h x h, fc1 4h x h, fc2 h x 4h, for several hidden sizes.
OPT_HIDDEN = [128, 768, 2048, 5120, 7168, 9216, 12288]  # 128: the tiny test models


def _layer_shapes(hidden: int) -> list[tuple[int, int]]:
    return [(3 * hidden, hidden), (hidden, hidden), (4 * hidden, hidden), (hidden, 4 * hidden)]


def _poison_allocator(num_bytes: int) -> None:
    """Fill memory the caching allocator will hand out next with NaNs, so unwritten outputs show."""
    block = torch.full((num_bytes // 2 + 1024,), float("nan"), dtype=torch.float16, device=CUDA)
    del block


def _rand_int8(shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor:
    return torch.randint(-128, 128, shape, dtype=torch.int8, device=CUDA, generator=generator)


def _gemm_case(m: int, n: int, k: int, seed: int, per_token: bool, per_channel: bool, with_bias: bool, dtype):
    g = torch.Generator(device=CUDA).manual_seed(seed)
    a, w = _rand_int8((m, k), g), _rand_int8((n, k), g)
    a_scale = torch.rand(m if per_token else 1, device=CUDA, generator=g) * 1e-3 + 1e-4
    w_scale = torch.rand(n if per_channel else 1, device=CUDA, generator=g) * 1e-3 + 1e-4
    bias = torch.randn(n, device=CUDA, generator=g).to(dtype) if with_bias else None
    return a, w, a_scale, w_scale, bias


def _exact_reference(a, w, a_scale, w_scale, bias, relu: bool) -> torch.Tensor:
    acc = ops.int8_matmul_float64(a, w).double()  # exact int32 accumulation
    out = acc * a_scale.double().reshape(-1, 1) * w_scale.double().reshape(1, -1)
    if bias is not None:
        out = out + bias.double()
    return out.clamp(min=0) if relu else out


def _check_gemm(m, n, k, seed, per_token, per_channel, with_bias, relu, dtype) -> None:
    a, w, a_scale, w_scale, bias = _gemm_case(m, n, k, seed, per_token, per_channel, with_bias, dtype)
    _poison_allocator(m * n * 2)
    out = ops.w8a8_gemm(a, w, a_scale, w_scale, bias, relu=relu, out_dtype=dtype)
    assert out.dtype == dtype and out.shape == (m, n)
    assert torch.isfinite(out).all(), "unwritten (poisoned) or non-finite output"
    expected = _exact_reference(a, w, a_scale, w_scale, bias, relu)
    error = (out.double() - expected).norm() / expected.norm()
    # fp16 rounds each output to 11 significant bits, bf16 to 8.
    assert error.item() < (1e-3 if dtype == torch.float16 else 4e-3), f"relative error {error.item():.2e}"
    if relu:
        assert (out >= 0).all()


def test_extension_is_loaded_on_gpu_machines() -> None:
    assert ops.EXTENSION_LOADED, "CUDA is available but engine._C is not built: the GPU would run references"


@pytest.mark.parametrize("m", M_SWEEP)
@pytest.mark.parametrize("hidden", OPT_HIDDEN)
def test_w8a8_gemm_over_opt_shapes(m: int, hidden: int) -> None:
    _check_opt_layers(m, hidden, seed=m * 131 + hidden)


def _check_opt_layers(m: int, hidden: int, seed: int) -> None:
    """Every layer shape of `hidden` at M = m, rotating through the epilogue options so every shape
    bucket meets each of them."""
    for index, (n, k) in enumerate(_layer_shapes(hidden)):
        if m * max(n, k) * 8 > 6e9:  # the float64 reference would need too much memory
            continue
        dtype = torch.float16 if index % 2 == 0 else torch.bfloat16
        _check_gemm(m, n, k, seed + index, per_token=index % 2 == 0, per_channel=index < 2,
                    with_bias=index != 3, relu=index == 2, dtype=dtype)  # fmt: skip


@pytest.mark.parametrize("m", [1, 16, 64, 256, 1024])
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w8a8_gemm_epilogue_options(m, per_token, per_channel, with_bias, relu, dtype) -> None:
    _check_gemm(m, 1024, 512, seed=m, per_token=per_token, per_channel=per_channel, with_bias=with_bias,
                relu=relu, dtype=dtype)  # fmt: skip


def test_w8a8_gemm_rejects_unaligned_shapes() -> None:
    a = torch.zeros(4, 40, dtype=torch.int8, device=CUDA)
    with pytest.raises(ValueError, match="multiples of 16"):
        ops.w8a8_gemm(a, torch.zeros(32, 40, dtype=torch.int8, device=CUDA), torch.ones(4, device=CUDA),
                      torch.ones(32, device=CUDA))  # fmt: skip


def test_w8a8_gemm_runs_on_the_current_stream() -> None:
    a, w, a_scale, w_scale, bias = _gemm_case(300, 2048, 1024, 5, True, True, True, torch.float16)
    stream = torch.cuda.Stream()
    with torch.cuda.stream(stream):
        out = ops.w8a8_gemm(a, w, a_scale, w_scale, bias, out_dtype=torch.float16)
    stream.synchronize()
    expected = _exact_reference(a, w, a_scale, w_scale, bias, relu=False)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-3


# --------------------------------------------------------------------------------------------------
# The sm90 schedules for problems of few output tiles (sm90_schedule in csrc/gemm/w8a8_gemm.cu). On an
# H100 (132 SMs) the dispatcher sends each shape below down the path named beside it; the sweep over
# OPT shapes above meets them too (out_proj and fc2 of hidden 2048-7168 at M <= 128 and M = 512), with
# its rotating epilogue options. Other GPUs run them through whatever their dispatch picks.

FEW_TILE_SHAPES = [
    (1, 5120, 5120),  # kSwapM16Narrow: OPT-13B out_proj at decode, 80 tiles of 64 weight rows
    (16, 7168, 7168),  # kSwapM16Narrow: OPT-30B out_proj, 112 tiles
    (7, 1040, 4096),  # kSwapM16Narrow, the last tile 16 rows deep
    (33, 5120, 20480),  # kSwapM64Narrow: OPT-13B fc2
    (64, 1040, 512),  # kSwapM64Narrow, 17 tiles: the last 2x1 cluster's second CTA lies past N
    (128, 5120, 5120),  # kM256 split-K in 2: 40 tiles, 80 CTAs
    (100, 7168, 7168),  # kM256 split-K in 2: 56 tiles, M short of the tile
    (512, 5120, 5120),  # kM256 instead of kLarge's 80 tiles: stream-K over 160 tiles
]


@pytest.mark.parametrize("m,n,k", FEW_TILE_SHAPES)
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_w8a8_gemm_few_tile_schedules(m, n, k, per_token, per_channel, with_bias, relu, dtype) -> None:
    _check_gemm(m, n, k, seed=m + n + k, per_token=per_token, per_channel=per_channel, with_bias=with_bias,
                relu=relu, dtype=dtype)  # fmt: skip


@pytest.mark.parametrize("m,n,k", [(1, 5120, 5120), (64, 7168, 7168)])
def test_decode_gemm_of_few_weight_tiles_runs_one_cta_per_tile(m: int, n: int, k: int) -> None:
    """Where N / 64 <= SMs, decode runs the non-persistent narrow kernel: no stream-K workspace to clear."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the sm90 kernels run on Hopper only")
    if -(-n // 64) > torch.cuda.get_device_properties(CUDA).multi_processor_count:
        pytest.skip("more 64-row tiles than SMs: the dispatcher keeps the stream-K kernels")
    a, w, a_scale, w_scale, bias = _gemm_case(m, n, k, 11, True, True, True, torch.float16)
    ops.w8a8_gemm(a, w, a_scale, w_scale, bias, out_dtype=torch.float16)  # allocations outside the profile
    names = _cuda_kernel_names(lambda: ops.w8a8_gemm(a, w, a_scale, w_scale, bias, out_dtype=torch.float16))
    # The profiler shortens long kernel names in the middle, so the schedule cannot be read from the name;
    # what the narrow path promises is one GEMM launch and no workspace to clear before it.
    assert sum("GemmUniversal" in name for name in names) == 1, names
    assert not any("emset" in name for name in names), names


# --------------------------------------------------------------------------------------------------
# The sm80 kernels (CUTLASS 2.x, mma.sync), forced with SMOOTHSERVE_GEMM_ARCH=sm80 so that they are
# tested on Hopper too; the variable is read on every call.

SM80_M_SWEEP = [1, 7, 16, 32, 33, 64, 100, 128, 129, 257, 512, 2048, 8192]  # around the 32 / 128 buckets


@pytest.fixture
def sm80_kernels(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SMOOTHSERVE_GEMM_ARCH", "sm80")


def _cuda_kernel_names(fn) -> list[str]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return [event.key for event in prof.key_averages()]


def test_gemm_arch_variable_selects_the_kernel_family(monkeypatch: pytest.MonkeyPatch) -> None:
    a, w, a_scale, w_scale, bias = _gemm_case(64, 1024, 512, 3, True, True, True, torch.float16)

    def run() -> None:
        ops.w8a8_gemm(a, w, a_scale, w_scale, bias, out_dtype=torch.float16)

    monkeypatch.setenv("SMOOTHSERVE_GEMM_ARCH", "sm80")
    # CUTLASS 2.x kernels are named after their kernel template: DefaultGemmWithVisitor, only ours.
    assert any("DefaultGemmWithVisitor" in name for name in _cuda_kernel_names(run))
    if torch.cuda.get_device_capability()[0] == 9:
        monkeypatch.setenv("SMOOTHSERVE_GEMM_ARCH", "auto")
        assert not any("DefaultGemmWithVisitor" in name for name in _cuda_kernel_names(run))
    else:
        monkeypatch.setenv("SMOOTHSERVE_GEMM_ARCH", "sm90")
        with pytest.raises(RuntimeError, match="needs a Hopper GPU"):
            run()
    monkeypatch.setenv("SMOOTHSERVE_GEMM_ARCH", "sm100")
    with pytest.raises(RuntimeError, match="must be auto, sm80 or sm90"):
        run()


@pytest.mark.parametrize("m", SM80_M_SWEEP)
@pytest.mark.parametrize("hidden", [128, 768, 5120, 7168])
def test_sm80_w8a8_gemm_over_opt_shapes(sm80_kernels, m: int, hidden: int) -> None:
    _check_opt_layers(m, hidden, seed=m * 137 + hidden)


@pytest.mark.parametrize("m", [1, 32, 33, 128, 129, 1024])
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_sm80_w8a8_gemm_epilogue_options(sm80_kernels, m, per_token, per_channel, with_bias, relu, dtype) -> None:
    _check_gemm(m, 1024, 512, seed=m + 7, per_token=per_token, per_channel=per_channel, with_bias=with_bias,
                relu=relu, dtype=dtype)  # fmt: skip


@pytest.mark.parametrize("arch", ["auto", "sm80"])
def test_w8a8_gemm_takes_unaligned_vector_views(monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    """Scale and bias views 4 bytes off a 16-byte boundary (the kernels read them 16 bytes at a time)."""
    monkeypatch.setenv("SMOOTHSERVE_GEMM_ARCH", arch)
    a, w, a_scale, w_scale, bias = _gemm_case(40, 512, 256, 9, True, True, True, torch.float16)
    a_scale_view = torch.cat([a_scale.new_zeros(1), a_scale])[1:]
    w_scale_view = torch.cat([w_scale.new_zeros(1), w_scale])[1:]
    bias_view = torch.cat([bias.new_zeros(2), bias])[2:]
    assert w_scale_view.data_ptr() % 16 != 0 and bias_view.data_ptr() % 16 != 0
    out = ops.w8a8_gemm(a, w, a_scale_view, w_scale_view, bias_view, out_dtype=torch.float16)
    expected = _exact_reference(a, w, a_scale, w_scale, bias, relu=False)
    assert ((out.double() - expected).norm() / expected.norm()).item() < 1e-3


# --------------------------------------------------------------------------------------------------
# The int8-output GEMM: bit-exact against its reference, which repeats the kernels' float32 operations
# in their order (fma and division each rounded once); see ops.w8a8_gemm_int8_out_reference.

INT8_OUT_M_SWEEP = [1, 7, 16, 33, 64, 65, 100, 128, 129, 257, 512, 2048]


def _int8_out_case(m, n, k, seed, per_token, per_channel, bias_dtype, relu):
    a, w, a_scale, w_scale, bias = _gemm_case(m, n, k, seed, per_token, per_channel, bias_dtype is not None,
                                              bias_dtype or torch.float16)  # fmt: skip
    # A static scale that saturates the largest outputs and leaves most of them in range.
    y = _exact_reference(a, w, a_scale, w_scale, bias, relu)
    out_scale = (y.abs().amax() / 127 * 0.5).float().reshape(1)
    return a, w, a_scale, w_scale, bias, out_scale


def _assert_int8_out_exact(a, w, a_scale, w_scale, bias, relu, out_scale) -> None:
    q = ops.w8a8_gemm_int8_out(a, w, a_scale, w_scale, bias, relu, out_scale)
    assert q.dtype == torch.int8 and q.shape == (a.shape[0], w.shape[0])
    expected = ops.w8a8_gemm_int8_out_reference(a, w, a_scale, w_scale, bias, relu, out_scale)
    differs = q != expected
    if differs.any():
        # Diagnose before failing: how far from a rounding tie were the differing codes?
        y = _exact_reference(a, w, a_scale, w_scale, bias, relu) / out_scale.double()
        tie_distance = ((y - y.floor()) - 0.5).abs()[differs]
        pytest.fail(
            f"{int(differs.sum())} of {q.numel()} codes differ (max |diff| "
            f"{(q.int() - expected.int()).abs().max().item()}); distance of y / out_scale from a .5 tie: "
            f"max {tie_distance.max().item():.3g}, median {tie_distance.median().item():.3g}"
        )
    assert (expected == 127).any() or (expected == -128).any(), "the case must exercise saturation"


@pytest.mark.parametrize("arch", ["auto", "sm80"])
@pytest.mark.parametrize("m", INT8_OUT_M_SWEEP)
@pytest.mark.parametrize("hidden", [128, 768, 5120, 7168])
def test_w8a8_gemm_int8_out_over_opt_shapes(monkeypatch: pytest.MonkeyPatch, arch: str, m: int, hidden: int) -> None:
    monkeypatch.setenv("SMOOTHSERVE_GEMM_ARCH", arch)
    for index, (n, k) in enumerate(_layer_shapes(hidden)):
        if m * max(n, k) * 8 > 6e9:
            continue
        bias_dtype = [torch.float16, torch.bfloat16, None][index % 3]
        case = _int8_out_case(m, n, k, m * 13 + hidden + index, index % 2 == 0, index < 2, bias_dtype, index == 2)
        _assert_int8_out_exact(*case[:5], index == 2, case[5])


@pytest.mark.parametrize("arch", ["auto", "sm80"])
@pytest.mark.parametrize("m", [1, 64, 65, 300])
@pytest.mark.parametrize("per_token", [True, False])
@pytest.mark.parametrize("per_channel", [True, False])
@pytest.mark.parametrize("bias_dtype", [torch.float16, torch.bfloat16, None])
@pytest.mark.parametrize("relu", [True, False])
def test_w8a8_gemm_int8_out_epilogue_options(monkeypatch, arch, m, per_token, per_channel, bias_dtype, relu) -> None:
    monkeypatch.setenv("SMOOTHSERVE_GEMM_ARCH", arch)
    case = _int8_out_case(m, 1024, 512, m + 3, per_token, per_channel, bias_dtype, relu)
    _assert_int8_out_exact(*case[:5], relu, case[5])


@pytest.mark.parametrize("arch", ["auto", "sm80"])
def test_w8a8_gemm_int8_out_rounds_exact_ties_half_to_even(monkeypatch: pytest.MonkeyPatch, arch: str) -> None:
    # Unit scales and out_scale 2: y = acc exactly, and every odd acc is an exact tie acc / 2.
    monkeypatch.setenv("SMOOTHSERVE_GEMM_ARCH", arch)
    g = torch.Generator(device=CUDA).manual_seed(1)
    a = torch.randint(-2, 3, (100, 64), dtype=torch.int8, device=CUDA, generator=g)
    w = torch.randint(-2, 3, (256, 64), dtype=torch.int8, device=CUDA, generator=g)
    one, two = torch.ones(1, device=CUDA), torch.full((1,), 2.0, device=CUDA)
    q = ops.w8a8_gemm_int8_out(a, w, one, one, None, False, two)
    acc = ops.int8_matmul_float64(a, w)
    assert (acc % 2 != 0).sum() > 1000, "the case must contain ties"
    assert torch.equal(q.long(), torch.round(acc.double() / 2).long().clamp(-128, 127))


@pytest.mark.parametrize("stream_k", ["0", "1"])
@pytest.mark.parametrize("m,n,k", [(1, 1024, 8192), (7, 768, 3072), (33, 2048, 16384), (300, 512, 8192)])
def test_sm80_stream_k_and_data_parallel_schedules(monkeypatch, stream_k: str, m: int, n: int, k: int) -> None:
    """The sm80 kernels' two schedules (SMOOTHSERVE_SM80_STREAMK): few output tiles and a long K, so that
    stream-K splits K across CTAs (peer reduction of int32 partials before the visitor epilogue)."""
    monkeypatch.setenv("SMOOTHSERVE_GEMM_ARCH", "sm80")
    monkeypatch.setenv("SMOOTHSERVE_SM80_STREAMK", stream_k)
    _check_gemm(m, n, k, seed=m + k, per_token=True, per_channel=True, with_bias=True, relu=False,
                dtype=torch.float16)  # fmt: skip
    case = _int8_out_case(m, n, k, m + n, True, True, torch.bfloat16, False)
    _assert_int8_out_exact(*case[:5], False, case[5])


ACTIVATION_SHAPES = [(5, 128), (1, 768), (7, 2048), (33, 5120), (257, 7168), (1024, 12288), (8192, 5120), (3, 49152)]


@pytest.mark.parametrize("m,k", ACTIVATION_SHAPES)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
def test_quantize_kernels_are_bit_exact(m: int, k: int, dtype: torch.dtype) -> None:
    g = torch.Generator(device=CUDA).manual_seed(m + k)
    x = (torch.randn(m, k, device=CUDA, generator=g) * torch.rand(m, 1, device=CUDA, generator=g) * 8).to(dtype)
    x[0, 0] = 0.5 * (x[0, 1].float().abs() + 1e-3)  # not all-zero rows, and an outlier channel:
    x[:, -1] *= 30
    q, scale = torch.ops.smoothserve.quantize_per_token(x)
    q_ref, scale_ref = ops.quantize_per_token_reference(x)
    assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref)
    q, scale = torch.ops.smoothserve.quantize_per_tensor(x)
    q_ref, scale_ref = ops.quantize_per_tensor_reference(x)
    assert torch.equal(scale, scale_ref) and torch.equal(q, q_ref)
    static = scale_ref * 0.5  # half the range: exercises saturation
    assert torch.equal(torch.ops.smoothserve.quantize_static(x, static), ops.quantize_static_reference(x, static))


@pytest.mark.parametrize("m,k", ACTIVATION_SHAPES)
@pytest.mark.parametrize("mode", ["per_token", "per_tensor_dynamic", "per_tensor_static"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_layernorm_quant_matches_reference(m: int, k: int, mode: str, dtype: torch.dtype) -> None:
    g = torch.Generator(device=CUDA).manual_seed(m * k)
    x = (torch.randn(m, k, device=CUDA, generator=g) * 3 + 0.5).to(dtype)
    weight = (torch.randn(k, device=CUDA, generator=g)).to(dtype)
    bias = (torch.randn(k, device=CUDA, generator=g) * 0.1).to(dtype)
    weight[:4] *= 40  # outlier channels, as in OPT
    static = torch.tensor([0.3], device=CUDA)
    q, scale = torch.ops.smoothserve.layernorm_quant(x, weight, bias, 1e-5, mode, static)
    q_ref, scale_ref = ops.layernorm_quant_reference(x, weight, bias, 1e-5, mode, static)
    # Different summation orders move values across a rounding boundary now and then: never by more
    # than one step, and rarely.
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=0)
    difference = (q.int() - q_ref.int()).abs()
    assert difference.max().item() <= 1
    assert difference.float().mean().item() < 1e-3


@pytest.mark.parametrize("level", ["O1", "O2", "O3"])
def test_tiny_w8a8_model_on_gpu_tracks_fp16(trained_outlier_model_dir, level: str) -> None:
    """The whole path on the GPU: fp16 model, calibration, smoothing, W8A8 through the kernels."""
    import copy

    from engine.config import ModelConfig, QuantConfig
    from engine.eval.fidelity import compare_models
    from engine.layers.linear import W8A8Linear
    from engine.models.loader import load_model
    from engine.quant.calibrate import calibrate
    from engine.quant.data import token_windows
    from engine.quant.quantize import smoothquant
    from engine.tiny_model import shipped_corpus, split_corpus
    from engine.tokenizer import load_tokenizer

    fp16 = load_model(ModelConfig(model=str(trained_outlier_model_dir), device="cuda", dtype="float16")).model
    tokenizer = load_tokenizer(trained_outlier_model_dir)
    train, heldout = split_corpus(shipped_corpus())
    stats = calibrate(fp16, token_windows(tokenizer, [train], 16, 128).token_ids, progress=False)
    w8a8 = copy.deepcopy(fp16)
    smoothquant(w8a8, QuantConfig(level=level), stats)
    assert isinstance(w8a8.decoder.layers[0].fc1, W8A8Linear) and w8a8.decoder.layers[0].fc1.weight.is_cuda
    fidelity = compare_models(fp16, w8a8, token_windows(tokenizer, [heldout], 8, 128).token_ids)
    assert fidelity.top1_agreement > 0.97, fidelity


@pytest.mark.parametrize("m,k", [*ACTIVATION_SHAPES, (5, 49152)])  # the last falls back to add + layernorm_quant
@pytest.mark.parametrize("mode", ["per_token", "per_tensor_dynamic", "per_tensor_static"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_add_layernorm_quant_matches_reference(m: int, k: int, mode: str, dtype: torch.dtype) -> None:
    g = torch.Generator(device=CUDA).manual_seed(m * k + 1)
    x = (torch.randn(m, k, device=CUDA, generator=g) * 2).to(dtype)
    residual = (torch.randn(m, k, device=CUDA, generator=g) * 5 + 1).to(dtype)
    weight = torch.randn(k, device=CUDA, generator=g).to(dtype)
    bias = (torch.randn(k, device=CUDA, generator=g) * 0.1).to(dtype)
    static = torch.tensor([0.3], device=CUDA)
    q, scale, summed = torch.ops.smoothserve.add_layernorm_quant(x, residual, weight, bias, 1e-5, mode, static)
    q_ref, scale_ref, summed_ref = ops.add_layernorm_quant_reference(x, residual, weight, bias, 1e-5, mode, static)
    assert torch.equal(summed, summed_ref)
    torch.testing.assert_close(scale, scale_ref, rtol=1e-5, atol=0)
    difference = (q.int() - q_ref.int()).abs()
    assert difference.max().item() <= 1 and difference.float().mean().item() < 1e-3
