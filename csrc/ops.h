// Every op of the smoothserve extension; schemas live in torch_bindings.cpp.
#pragma once

#include <torch/all.h>

#include <optional>
#include <string>
#include <tuple>

namespace smoothserve {

torch::Tensor w8a8_gemm(const torch::Tensor& a, const torch::Tensor& w, const torch::Tensor& a_scale,
                        const torch::Tensor& w_scale, const std::optional<torch::Tensor>& bias, bool relu,
                        at::ScalarType out_dtype);

// The same GEMM requantized to int8 in its epilogue (static O3 activations: fc1 -> fc2 without an fp16
// round trip): out = clamp(rint(y / out_scale), -128, 127), out_scale a float32 [1].
torch::Tensor w8a8_gemm_int8_out(const torch::Tensor& a, const torch::Tensor& w, const torch::Tensor& a_scale,
                                 const torch::Tensor& w_scale, const std::optional<torch::Tensor>& bias, bool relu,
                                 const torch::Tensor& out_scale);

std::tuple<torch::Tensor, torch::Tensor> quantize_per_token(const torch::Tensor& x);
std::tuple<torch::Tensor, torch::Tensor> quantize_per_tensor(const torch::Tensor& x);
torch::Tensor quantize_static(const torch::Tensor& x, const torch::Tensor& scale);

std::tuple<torch::Tensor, torch::Tensor> layernorm_quant(const torch::Tensor& x,
                                                         const std::optional<torch::Tensor>& weight,
                                                         const std::optional<torch::Tensor>& bias, double eps,
                                                         const std::string& mode,
                                                         const std::optional<torch::Tensor>& static_scale);

std::tuple<torch::Tensor, torch::Tensor, torch::Tensor> add_layernorm_quant(
    const torch::Tensor& x, const torch::Tensor& residual, const std::optional<torch::Tensor>& weight,
    const std::optional<torch::Tensor>& bias, double eps, const std::string& mode,
    const std::optional<torch::Tensor>& static_scale);

// Paged KV cache: caches are [num_blocks, block_size, num_heads, head_dim]; slot = block * block_size + offset.
void write_kv_cache(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& key_cache,
                    torch::Tensor& value_cache, const torch::Tensor& slots);

// An int8 cache: each (token, head) row quantized with its own float32 scale, scales [blocks, block_size, H].
void write_kv_cache_int8(const torch::Tensor& key, const torch::Tensor& value, torch::Tensor& key_cache,
                         torch::Tensor& value_cache, torch::Tensor& key_scales, torch::Tensor& value_scales,
                         const torch::Tensor& slots);

// key_scales/value_scales are given exactly when the caches are int8.
torch::Tensor paged_attention_decode(const torch::Tensor& query, const torch::Tensor& key_cache,
                                     const torch::Tensor& value_cache, const torch::Tensor& block_tables,
                                     const torch::Tensor& seq_lens, double scale,
                                     const std::optional<torch::Tensor>& key_scales,
                                     const std::optional<torch::Tensor>& value_scales);

}  // namespace smoothserve
