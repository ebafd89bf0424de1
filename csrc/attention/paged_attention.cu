// Decode attention over the paged KV cache: one new query token per sequence.
//
// The cache is [num_blocks, block_size, num_heads, head_dim]; sequence b's token t lives in physical
// block block_tables[b][t / block_size] at offset t % block_size. A token's key for one head is
// head_dim contiguous elements, so a tile of tokens is loaded with coalesced 16-byte vectors.
//
// An int8 cache holds round(x / s) with one float32 scale s per (slot, head) in key_scales/value_scales
// [num_blocks, block_size, num_heads]. Its tiles stay int8 in shared memory (converted to float where they
// are read, with no widening pass) and the scales are applied where they factor out: a key's to its score,
// a value's to its probability weight. Half the bytes of an fp16 cache are read, and nothing else changes.
//
// Work split (flash-decoding): one CTA per (head, sequence, partition of partition_tokens). A CTA walks its
// partition in load tiles: stage K and V tiles in shared memory, then per compute tile of kTileTokens score it,
// update an online softmax (running max m and sum l, shared by all threads), and accumulate p·V. A load tile is one
// compute tile of an fp16/bf16 cache and two of an int8 cache: each load tile is one latency-bound round trip to
// memory, so the half-size int8 rows move as many bytes per trip as fp16 rows (and fill as much shared memory). With
// one partition the CTA writes the output; with several, each writes (normalized partial output, m, l) and a second
// kernel merges them. The grid depends only on tensor shapes (never on lengths held on the device), so a CUDA graph
// captured for a batch size replays for any lengths. For the same reason the partition length is chosen from the
// shape: short partitions when few (head, sequence) rows would leave SMs idle (batch 1 of OPT-30B is 56 rows on 132
// SMs), long ones when rows are plentiful (fewer partials).
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAMacros.h>

#include <cfloat>
#include <cstdint>
#include <mutex>
#include <type_traits>

#include "../cuda_utils.h"
#include "../ops.h"
#include "kv_cache_checks.h"

namespace smoothserve {
namespace {

constexpr int kThreads = 128;
constexpr int kTileTokens = 64;
constexpr int kMaxPartitionTokens = 512;
// CTAs per SM that a typical context (kMaxPartitionTokens tokens) should give at least.
constexpr int kCtasPerSm = 4;
constexpr int kVec = 8;  // elements per 16-byte vector of fp16/bf16

// int8 to float without the I2F instruction, which sm90 retires at 16 results per clock per SM (measured on
// the H100: 628 -> 590 us per layer at OPT-13B, batch 224, context 576). `biased` holds four int8 values
// XOR 0x80 (x + 128, as unsigned bytes); byte I becomes the low mantissa byte of 2^23, and subtracting
// 2^23 + 128 leaves x exactly (a byte permute and an add).
template <int I>
__device__ __forceinline__ float biased_byte_to_float(uint32_t biased) {
  return __int_as_float(static_cast<int>(__byte_perm(biased, 0x4B000000u, 0x7650 + I))) - 8388736.0f;
}

// Two neighbouring cache elements (one aligned 2- or 4-byte shared-memory read) as floats.
template <typename CacheT>
__device__ __forceinline__ float2 load_pair(const CacheT* p) {
  if constexpr (sizeof(CacheT) == 1) {
    const uint32_t biased = uint32_t(*reinterpret_cast<const uint16_t*>(p)) ^ 0x8080u;
    return make_float2(biased_byte_to_float<0>(biased), biased_byte_to_float<1>(biased));
  } else {
    return make_float2(static_cast<float>(p[0]), static_cast<float>(p[1]));
  }
}

// Elements of one shared-memory read when scoring a key: 16 bytes, or 8 for an int8 row whose halves are
// not whole 16-byte vectors (head_dim 80). One thread scores half a row.
template <typename CacheT, int HeadDim>
constexpr int score_read_elems() {
  return (sizeof(CacheT) == 1 && HeadDim % 32 != 0) ? 8 : 16 / sizeof(CacheT);
}

template <int Bytes>
struct RawVector;
template <>
struct RawVector<16> {
  using type = uint4;
};
template <>
struct RawVector<8> {
  using type = uint2;
};

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, offset));
  return v;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffff, v, offset);
  return v;
}

template <typename CacheT, int HeadDim>
struct SharedTiles {
  static constexpr int kSubTiles = sizeof(CacheT) == 1 ? 2 : 1;  // compute tiles per load tile
  static constexpr int kTokens = kTileTokens * kSubTiles;         // tokens per load tile
  // Rows are padded by one 16-byte vector so the score step's reads of neighbouring rows hit different banks.
  static constexpr int kRow = HeadDim + 16 / sizeof(CacheT);
  static constexpr int kPairs = HeadDim / 2;
  // Threads that accumulate p·V: `kGroups` groups of `kPairs` threads, each group a share of the tile.
  static constexpr int kGroups = kThreads / kPairs;
  alignas(16) CacheT keys[kTokens * kRow];
  alignas(16) CacheT values[kTokens * kRow];
  float query[HeadDim];
  float logits[kTileTokens];
  float probs[kTileTokens];
  float key_scale[kTokens];  // int8 caches only
  float value_scale[kTokens];
  float partial[kGroups * HeadDim];
};

// At least 4 CTAs per SM (<= 128 registers a thread): each keeps a load tile in flight, and fewer leave the
// memory system idle between a CTA's round trips. (head_dim 256's tiles allow 3 CTAs per SM by shared memory.)
template <typename T, typename CacheT, int HeadDim>
__global__ void __launch_bounds__(kThreads, HeadDim <= 128 ? 4 : 1)
    paged_attention_decode_kernel(T* __restrict__ out,                 // [B, H, D]
                                  float* __restrict__ partial_out,     // [B, H, P, D] when P > 1
                                  float* __restrict__ partial_max,     // [B, H, P]
                                  float* __restrict__ partial_sum,     // [B, H, P]
                                  const T* __restrict__ query,         // [B, H, D], token stride q_stride
                                  int64_t q_stride,
                                  const CacheT* __restrict__ key_cache,  // [blocks, block_size, H, D]
                                  const CacheT* __restrict__ value_cache,
                                  const float* __restrict__ key_scales,  // [blocks, block_size, H]: int8 only
                                  const float* __restrict__ value_scales,
                                  const int32_t* __restrict__ block_tables,  // [B, max_blocks]
                                  int max_blocks, const int32_t* __restrict__ seq_lens, int block_size,
                                  int partition_tokens,  // a multiple of the load tile's tokens
                                  float scale) {
  using Tiles = SharedTiles<CacheT, HeadDim>;
  constexpr bool kQuantized = std::is_same_v<CacheT, int8_t>;
  static_assert(kQuantized || std::is_same_v<CacheT, T>, "the cache holds the query's type or int8");
  constexpr int kCacheVec = 16 / sizeof(CacheT);  // cache elements per 16-byte load
  constexpr int kCacheVecsPerRow = HeadDim / kCacheVec;
  static_assert(HeadDim % kCacheVec == 0, "a cache row is a whole number of 16-byte vectors");
  static_assert(HeadDim % (2 * score_read_elems<CacheT, HeadDim>()) == 0,
                "two threads score a token, each an equal number of shared-memory reads");
  static_assert(kThreads == 2 * kTileTokens && kTileTokens == 64, "the score and softmax steps assume this shape");
  extern __shared__ __align__(16) unsigned char shared_raw[];
  Tiles& s = *reinterpret_cast<Tiles*>(shared_raw);

  wait_for_prior_grids();  // PDL: see cuda_utils.h
  allow_next_grid();
  const int head = blockIdx.x, seq = blockIdx.y, partition = blockIdx.z;
  const int num_heads = gridDim.x, num_partitions = gridDim.z;
  const int tid = threadIdx.x, lane = tid % 32;
  // The reference sees at most the table's max_blocks * block_size tokens; a longer length would read
  // block ids past the row (and blocks past the cache), so it is clamped to the same capacity.
  const int seq_len = static_cast<int>(min(int64_t(seq_lens[seq]), int64_t(max_blocks) * block_size));
  const int begin = partition * partition_tokens;
  const int end = min(seq_len, begin + partition_tokens);
  const int64_t row = (int64_t(seq) * num_heads + head);
  // A partition past the sequence's end has nothing to add: the merge reads only the partitions the
  // length covers. (With one partition the CTA writes the output itself, zeros for an empty row.)
  if (num_partitions > 1 && begin >= seq_len) return;

  for (int d = tid; d < HeadDim; d += kThreads)
    s.query[d] = static_cast<float>(query[seq * q_stride + head * HeadDim + d]) * scale;

  const int32_t* table = block_tables + int64_t(seq) * max_blocks;
  const int64_t token_stride = int64_t(num_heads) * HeadDim;
  float m = -FLT_MAX, l = 0.0f;
  // p·V accumulator: thread `tid` owns the dimension pair `pair` for tile tokens group, group + kGroups, ...
  const int pair = tid % Tiles::kPairs, group = tid / Tiles::kPairs;
  float2 acc = make_float2(0.0f, 0.0f);

  // Software pipelining through registers: the next tile's K/V vectors (and scales) are loaded while
  // this tile is scored and accumulated, so each CTA keeps a tile of loads in flight instead of
  // alternating between waiting on memory and computing (which left HBM at ~75 % of copy bandwidth
  // with an fp16 cache and far lower with the half-size int8 tiles).
  constexpr int kLoadTokens = Tiles::kTokens;
  constexpr int kTileVecs = kLoadTokens * kCacheVecsPerRow;
  constexpr int kLoads = (kTileVecs + kThreads - 1) / kThreads;  // 16-byte vectors per thread and tensor
  static_assert(!kQuantized || kLoadTokens == kThreads, "each thread fetches one token's two scales");
  uint4 k_next[kLoads], v_next[kLoads];
  float key_scale_next = 0.0f, value_scale_next = 0.0f;
  const auto fetch = [&](int tile) {
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int v = tid + i * kThreads;
      const int t = v / kCacheVecsPerRow, part = v % kCacheVecsPerRow;
      const int token = tile + t;
      k_next[i] = v_next[i] = make_uint4(0, 0, 0, 0);  // zeros keep 0 * garbage out of p·V
      if (v < kTileVecs && token < end) {
        const int64_t slot = int64_t(table[token / block_size]) * block_size + token % block_size;
        const int64_t offset = slot * token_stride + head * HeadDim + part * kCacheVec;
        k_next[i] = *reinterpret_cast<const uint4*>(key_cache + offset);
        v_next[i] = *reinterpret_cast<const uint4*>(value_cache + offset);
      }
    }
    if constexpr (kQuantized) {
      const int token = tile + tid;
      key_scale_next = value_scale_next = 0.0f;
      if (token < end) {
        const int64_t slot = int64_t(table[token / block_size]) * block_size + token % block_size;
        key_scale_next = key_scales[slot * num_heads + head];
        value_scale_next = value_scales[slot * num_heads + head];
      }
    }
  };
  if (begin < end) fetch(begin);

  for (int tile = begin; tile < end; tile += kLoadTokens) {
    __syncthreads();  // the previous tile's readers are done
#pragma unroll
    for (int i = 0; i < kLoads; ++i) {
      const int v = tid + i * kThreads;
      if (v >= kTileVecs) break;
      const int t = v / kCacheVecsPerRow, part = v % kCacheVecsPerRow;
      *reinterpret_cast<uint4*>(&s.keys[t * Tiles::kRow + part * kCacheVec]) = k_next[i];
      *reinterpret_cast<uint4*>(&s.values[t * Tiles::kRow + part * kCacheVec]) = v_next[i];
    }
    if constexpr (kQuantized) {
      s.key_scale[tid] = key_scale_next;
      s.value_scale[tid] = value_scale_next;
    }
    __syncthreads();
    if (tile + kLoadTokens < end) fetch(tile + kLoadTokens);

#pragma unroll 1
    for (int sub = 0; sub < Tiles::kSubTiles; ++sub) {
      // Compute tile `sub`: shared-memory rows base.., tokens first... (the same for every thread).
      const int base = sub * kTileTokens, first = tile + base;
      if (first >= end) break;

      // Scores: two threads per token, each half of the head dimension, combined by one shuffle.
      {
        const int t = tid / 2, half = tid % 2;
        constexpr int kElems = score_read_elems<CacheT, HeadDim>();
        using Raw = typename RawVector<kElems * sizeof(CacheT)>::type;
        constexpr int kHalfReads = HeadDim / kElems / 2;
        float dot = 0.0f;
#pragma unroll
        for (int i = 0; i < kHalfReads; ++i) {
          const int d0 = (half * kHalfReads + i) * kElems;
          const Raw raw = *reinterpret_cast<const Raw*>(&s.keys[(base + t) * Tiles::kRow + d0]);
          if constexpr (kQuantized) {
            const uint32_t* words = reinterpret_cast<const uint32_t*>(&raw);
#pragma unroll
            for (int w = 0; w < kElems / 4; ++w) {
              const uint32_t biased = words[w] ^ 0x80808080u;
              dot += s.query[d0 + 4 * w] * biased_byte_to_float<0>(biased);
              dot += s.query[d0 + 4 * w + 1] * biased_byte_to_float<1>(biased);
              dot += s.query[d0 + 4 * w + 2] * biased_byte_to_float<2>(biased);
              dot += s.query[d0 + 4 * w + 3] * biased_byte_to_float<3>(biased);
            }
          } else {
            const CacheT* k = reinterpret_cast<const CacheT*>(&raw);
#pragma unroll
            for (int j = 0; j < kElems; ++j) dot += s.query[d0 + j] * static_cast<float>(k[j]);
          }
        }
        dot += __shfl_xor_sync(0xffffffff, dot, 1);
        if constexpr (kQuantized) dot *= s.key_scale[base + t];
        if (half == 0) s.logits[t] = (first + t < end) ? dot : -FLT_MAX;
      }
      __syncthreads();

      // Every warp computes the tile maximum itself (no extra barrier); all threads keep the same m and l.
      const float tile_max = warp_max(fmaxf(s.logits[lane], s.logits[lane + 32]));
      const float new_m = fmaxf(m, tile_max);
      if (tid < kTileTokens) s.probs[tid] = (first + tid < end) ? __expf(s.logits[tid] - new_m) : 0.0f;
      __syncthreads();
      const float tile_sum = warp_sum(s.probs[lane] + s.probs[lane + 32]);
      const float correction = __expf(m - new_m);
      l = l * correction + tile_sum;
      m = new_m;

      if (group < Tiles::kGroups) {
        acc.x *= correction;
        acc.y *= correction;
        const int tokens = min(kTileTokens, end - first);
#pragma unroll 4
        for (int t = group; t < tokens; t += Tiles::kGroups) {
          const float p = kQuantized ? s.probs[t] * s.value_scale[base + t] : s.probs[t];
          const float2 v = load_pair(&s.values[(base + t) * Tiles::kRow + 2 * pair]);
          acc.x += p * v.x;
          acc.y += p * v.y;
        }
      }
    }  // compute tiles
  }

  // Merge the groups' accumulators.
  __syncthreads();
  if (group < Tiles::kGroups) {
    s.partial[group * HeadDim + 2 * pair] = acc.x;
    s.partial[group * HeadDim + 2 * pair + 1] = acc.y;
  }
  __syncthreads();
  const float inv_l = l > 0.0f ? 1.0f / l : 0.0f;  // l == 0: an empty partition or a padding row
  for (int d = tid; d < HeadDim; d += kThreads) {
    float sum = 0.0f;
#pragma unroll
    for (int g = 0; g < Tiles::kGroups; ++g) sum += s.partial[g * HeadDim + d];
    if (num_partitions == 1) {
      out[row * HeadDim + d] = static_cast<T>(sum * inv_l);
    } else {
      partial_out[(row * num_partitions + partition) * HeadDim + d] = sum * inv_l;
    }
  }
  if (num_partitions > 1 && tid == 0) {
    partial_max[row * num_partitions + partition] = l > 0.0f ? m : -FLT_MAX;
    partial_sum[row * num_partitions + partition] = l;
  }
}

// out = sum_p w_p o_p / sum_p w_p with w_p = l_p exp(m_p - max_p m_p): the softmax over the partitions
// the sequence's length covers (the grid is sized for the longest possible one; the rest were skipped).
template <typename T, int HeadDim>
__global__ void __launch_bounds__(kThreads)
    merge_partitions_kernel(T* __restrict__ out, const float* __restrict__ partial_out,
                            const float* __restrict__ partial_max, const float* __restrict__ partial_sum,
                            int num_partitions, const int32_t* __restrict__ seq_lens, int64_t max_tokens,
                            int partition_tokens) {
  wait_for_prior_grids();  // PDL: see cuda_utils.h
  allow_next_grid();
  const int64_t row = int64_t(blockIdx.y) * gridDim.x + blockIdx.x;
  const int64_t seq_len = min(int64_t(seq_lens[blockIdx.y]), max_tokens);  // clamped as the decode kernel does
  const int used = static_cast<int>(min(int64_t(num_partitions), (max(seq_len, int64_t(0)) + partition_tokens - 1) /
                                                                     partition_tokens));
  const float* maxes = partial_max + row * num_partitions;
  const float* sums = partial_sum + row * num_partitions;
  float global_max = -FLT_MAX;
  for (int p = 0; p < used; ++p) global_max = fmaxf(global_max, maxes[p]);
  float total = 0.0f;
  for (int p = 0; p < used; ++p) total += sums[p] * __expf(maxes[p] - global_max);
  const float inv_total = total > 0.0f ? 1.0f / total : 0.0f;
  for (int d = threadIdx.x; d < HeadDim; d += kThreads) {
    float value = 0.0f;
    for (int p = 0; p < used; ++p) {
      const float weight = sums[p] * __expf(maxes[p] - global_max);
      value += weight * partial_out[(row * num_partitions + p) * HeadDim + d];
    }
    out[row * HeadDim + d] = static_cast<T>(value * inv_total);
  }
}

// A power of two from load_tokens to kMaxPartitionTokens.
int choose_partition_tokens(int rows, int device, int load_tokens) {
  const int sms = device_facts(device).sm_count;
  int tokens = kMaxPartitionTokens;
  while (tokens > load_tokens && int64_t(rows) * (kMaxPartitionTokens / tokens) < int64_t(kCtasPerSm) * sms)
    tokens /= 2;
  return tokens;
}

template <typename T, typename CacheT, int HeadDim>
void launch_decode(torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& key_cache,
                   const torch::Tensor& value_cache, const float* key_scales, const float* value_scales,
                   const torch::Tensor& block_tables, const torch::Tensor& seq_lens, double scale) {
  const int batch = query.size(0), num_heads = query.size(1);
  const int block_size = key_cache.size(1);
  const int max_blocks = block_tables.size(1);
  const int64_t max_tokens = int64_t(max_blocks) * block_size;
  const int device = c10::cuda::current_device();
  using Tiles = SharedTiles<CacheT, HeadDim>;
  const int partition_tokens = choose_partition_tokens(batch * num_heads, device, Tiles::kTokens);
  const int num_partitions = static_cast<int>((max_tokens + partition_tokens - 1) / partition_tokens);
  const auto float_options = query.options().dtype(torch::kFloat);
  torch::Tensor partial_out, partial_max, partial_sum;
  if (num_partitions > 1) {
    partial_out = torch::empty({batch, num_heads, num_partitions, HeadDim}, float_options);
    partial_max = torch::empty({batch, num_heads, num_partitions}, float_options);
    partial_sum = torch::empty({batch, num_heads, num_partitions}, float_options);
  }
  const size_t shared = sizeof(Tiles);
  auto kernel = paged_attention_decode_kernel<T, CacheT, HeadDim>;
  // The dynamic shared-memory limit (48 KB unless raised; head_dim 256 needs ~69 KB) belongs to the
  // kernel as loaded in one device's context, so it is raised once per device and instantiation: a
  // process-wide flag would leave a second GPU of the same process at the default and fail its launch.
  // It is a host-side setting, not stream work, so a first call inside a graph capture is harmless.
  static std::once_flag shared_memory_set[C10_COMPILE_TIME_MAX_GPUS];
  TORCH_CHECK(device < C10_COMPILE_TIME_MAX_GPUS, "paged_attention_decode: device index ", device, " out of range");
  std::call_once(shared_memory_set[device], [&] {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared));
  });
  const cudaStream_t stream = current_stream();
  const dim3 grid(num_heads, batch, num_partitions);
  auto ptr = [](const torch::Tensor& t) { return t.defined() ? t.data_ptr<float>() : nullptr; };
  launch_kernel(kernel, grid, kThreads, shared, stream,
      reinterpret_cast<T*>(out.data_ptr()), ptr(partial_out), ptr(partial_max), ptr(partial_sum),
      reinterpret_cast<const T*>(query.data_ptr()), query.stride(0),
      reinterpret_cast<const CacheT*>(key_cache.data_ptr()), reinterpret_cast<const CacheT*>(value_cache.data_ptr()),
      key_scales, value_scales, block_tables.data_ptr<int32_t>(), max_blocks, seq_lens.data_ptr<int32_t>(),
      block_size, partition_tokens, static_cast<float>(scale));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  if (num_partitions > 1) {
    launch_kernel(merge_partitions_kernel<T, HeadDim>, dim3(num_heads, batch), kThreads, 0, stream,
        reinterpret_cast<T*>(out.data_ptr()), partial_out.data_ptr<float>(), partial_max.data_ptr<float>(),
        partial_sum.data_ptr<float>(), num_partitions, seq_lens.data_ptr<int32_t>(), max_tokens, partition_tokens);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

template <typename T, typename CacheT>
void dispatch_head_dim(torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& key_cache,
                       const torch::Tensor& value_cache, const float* key_scales, const float* value_scales,
                       const torch::Tensor& block_tables, const torch::Tensor& seq_lens, double scale) {
  const auto launch = [&](auto head_dim) {
    launch_decode<T, CacheT, decltype(head_dim)::value>(out, query, key_cache, value_cache, key_scales,
                                                         value_scales, block_tables, seq_lens, scale);
  };
  switch (query.size(2)) {
    case 32: return launch(std::integral_constant<int, 32>{});
    case 64: return launch(std::integral_constant<int, 64>{});
    case 80: return launch(std::integral_constant<int, 80>{});
    case 96: return launch(std::integral_constant<int, 96>{});
    case 128: return launch(std::integral_constant<int, 128>{});
    case 256: return launch(std::integral_constant<int, 256>{});
    default: TORCH_CHECK(false, "paged_attention_decode: head_dim ", query.size(2), " is not supported");
  }
}

template <typename T>
void dispatch_cache_type(torch::Tensor& out, const torch::Tensor& query, const torch::Tensor& key_cache,
                         const torch::Tensor& value_cache, const std::optional<torch::Tensor>& key_scales,
                         const std::optional<torch::Tensor>& value_scales, const torch::Tensor& block_tables,
                         const torch::Tensor& seq_lens, double scale) {
  if (key_cache.scalar_type() == torch::kChar) {
    dispatch_head_dim<T, int8_t>(out, query, key_cache, value_cache, key_scales->data_ptr<float>(),
                                 value_scales->data_ptr<float>(), block_tables, seq_lens, scale);
  } else {
    dispatch_head_dim<T, T>(out, query, key_cache, value_cache, nullptr, nullptr, block_tables, seq_lens, scale);
  }
}

}  // namespace

torch::Tensor paged_attention_decode(const torch::Tensor& query, const torch::Tensor& key_cache,
                                     const torch::Tensor& value_cache, const torch::Tensor& block_tables,
                                     const torch::Tensor& seq_lens, double scale,
                                     const std::optional<torch::Tensor>& key_scales,
                                     const std::optional<torch::Tensor>& value_scales) {
  TORCH_CHECK(query.is_cuda() && query.dim() == 3, "paged_attention_decode: query must be a CUDA [B, H, D] tensor");
  TORCH_CHECK(query.stride(2) == 1 && query.stride(1) == query.size(2),
              "paged_attention_decode: each query row must be contiguous [H, D]");
  TORCH_CHECK(query.stride(0) % kVec == 0, "paged_attention_decode: query row stride must be a multiple of 8");
  TORCH_CHECK(key_cache.dim() == 4 && key_cache.is_contiguous() && value_cache.is_contiguous() &&
                  key_cache.sizes() == value_cache.sizes(),
              "paged_attention_decode: caches must be contiguous [blocks, block_size, H, D] of one shape");
  // Tiles are loaded as 16-byte vectors at element offsets that are multiples of 8 (head_dim % 16 == 0).
  TORCH_CHECK(reinterpret_cast<uintptr_t>(key_cache.data_ptr()) % 16 == 0 &&
                  reinterpret_cast<uintptr_t>(value_cache.data_ptr()) % 16 == 0,
              "paged_attention_decode: caches must be 16-byte aligned");
  TORCH_CHECK(key_cache.size(2) == query.size(1) && key_cache.size(3) == query.size(2),
              "paged_attention_decode: caches and query disagree on heads or head_dim");
  const bool quantized = key_cache.scalar_type() == torch::kChar;
  TORCH_CHECK((key_cache.scalar_type() == query.scalar_type() || quantized) &&
                  value_cache.scalar_type() == key_cache.scalar_type(),
              "paged_attention_decode: caches must both have the query's dtype or both be int8");
  TORCH_CHECK(quantized == (key_scales.has_value() && value_scales.has_value()),
              "paged_attention_decode: an int8 cache needs key and value scales, and only an int8 cache takes them");
  if (quantized) {
    check_kv_scales("paged_attention_decode", *key_scales, key_cache);
    check_kv_scales("paged_attention_decode", *value_scales, value_cache);
  }
  TORCH_CHECK(block_tables.scalar_type() == torch::kInt && block_tables.dim() == 2 &&
                  block_tables.is_contiguous() && block_tables.size(0) == query.size(0),
              "paged_attention_decode: block_tables must be contiguous int32 [B, max_blocks]");
  TORCH_CHECK(seq_lens.scalar_type() == torch::kInt && seq_lens.dim() == 1 && seq_lens.size(0) == query.size(0),
              "paged_attention_decode: seq_lens must be int32 [B]");
  TORCH_CHECK(block_tables.device() == query.device() && seq_lens.device() == query.device() &&
                  key_cache.device() == query.device() && value_cache.device() == query.device(),
              "paged_attention_decode: all tensors must be on the query's device");
  const c10::cuda::CUDAGuard guard(query.device());
  auto out = torch::empty({query.size(0), query.size(1), query.size(2)}, query.options());
  if (query.size(0) == 0) return out;
  // No table columns: every length clamps to 0 (zeros, as the reference); a grid of 0 partitions cannot launch.
  if (block_tables.size(1) == 0) return out.zero_();
  switch (query.scalar_type()) {
    case torch::kHalf:
      dispatch_cache_type<at::Half>(out, query, key_cache, value_cache, key_scales, value_scales, block_tables,
                                    seq_lens, scale);
      break;
    case torch::kBFloat16:
      dispatch_cache_type<at::BFloat16>(out, query, key_cache, value_cache, key_scales, value_scales,
                                        block_tables, seq_lens, scale);
      break;
    default: TORCH_CHECK(false, "paged_attention_decode: query must be float16 or bfloat16");
  }
  return out;
}

}  // namespace smoothserve
