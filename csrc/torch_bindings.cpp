// The one place the extension's ops are declared (schemas) and bound to their CUDA implementations.
#include <torch/library.h>

#include "ops.h"

TORCH_LIBRARY(smoothserve, m) {
  // out[m, n] = a_scale[m|0] * w_scale[n|0] * sum_k a[m, k] w[n, k] + bias[n], then ReLU if asked.
  m.def(
      "w8a8_gemm(Tensor a, Tensor w, Tensor a_scale, Tensor w_scale, Tensor? bias, bool relu, "
      "ScalarType out_dtype) -> Tensor");
  // The same y requantized: clamp(rint(y / out_scale), -128, 127) as int8 [M, N]; bias fp16/bf16, out_scale [1].
  m.def(
      "w8a8_gemm_int8_out(Tensor a, Tensor w, Tensor a_scale, Tensor w_scale, Tensor? bias, bool relu, "
      "Tensor out_scale) -> Tensor");
  m.def("quantize_per_token(Tensor x) -> (Tensor, Tensor)");
  m.def("quantize_per_tensor(Tensor x) -> (Tensor, Tensor)");
  m.def("quantize_static(Tensor x, Tensor scale) -> Tensor");
  m.def(
      "layernorm_quant(Tensor x, Tensor? weight, Tensor? bias, float eps, str mode, Tensor? static_scale) "
      "-> (Tensor, Tensor)");
  // (quantized LayerNorm(x + residual), its scales, x + residual): the residual add fused in front.
  m.def(
      "add_layernorm_quant(Tensor x, Tensor residual, Tensor? weight, Tensor? bias, float eps, str mode, "
      "Tensor? static_scale) -> (Tensor, Tensor, Tensor)");
  // key_cache[slots[t]] = key[t] (and values); a negative slot is a padding row and writes nothing.
  m.def(
      "write_kv_cache(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, Tensor slots) "
      "-> ()");
  // An int8 cache: each (token, head) row quantized as quantize_per_token would, its scale at the same slot.
  m.def(
      "write_kv_cache_int8(Tensor key, Tensor value, Tensor(a!) key_cache, Tensor(b!) value_cache, "
      "Tensor(c!) key_scales, Tensor(d!) value_scales, Tensor slots) -> ()");
  // One query token per sequence [B, H, D] over seq_lens[b] cached tokens (its own included); scales
  // [blocks, block_size, H] exactly when the caches are int8.
  m.def(
      "paged_attention_decode(Tensor query, Tensor key_cache, Tensor value_cache, Tensor block_tables, "
      "Tensor seq_lens, float scale, Tensor? key_scales=None, Tensor? value_scales=None) -> Tensor");
}

TORCH_LIBRARY_IMPL(smoothserve, CUDA, m) {
  m.impl("w8a8_gemm", &smoothserve::w8a8_gemm);
  m.impl("w8a8_gemm_int8_out", &smoothserve::w8a8_gemm_int8_out);
  m.impl("quantize_per_token", &smoothserve::quantize_per_token);
  m.impl("quantize_per_tensor", &smoothserve::quantize_per_tensor);
  m.impl("quantize_static", &smoothserve::quantize_static);
  m.impl("layernorm_quant", &smoothserve::layernorm_quant);
  m.impl("add_layernorm_quant", &smoothserve::add_layernorm_quant);
  m.impl("write_kv_cache", &smoothserve::write_kv_cache);
  m.impl("write_kv_cache_int8", &smoothserve::write_kv_cache_int8);
  m.impl("paged_attention_decode", &smoothserve::paged_attention_decode);
}

// Importing engine._C registers the ops above.
#include <Python.h>
static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, 0, nullptr};
PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&module); }
