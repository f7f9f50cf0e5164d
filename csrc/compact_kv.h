// In-place KV-cache compaction: the kernel's host interface, free of torch headers so that
// `nvcc -c csrc/compact_kv.cu` builds on its own (python_tests/test_csrc_build.py does that).
//
// For every layer l, sequence b and i < n_b = accept_lengths[b] (L_b = seqlens[b]):
//   cache[l, b, L_b + i] = cache[l, b, L_b + accept_indices[b, i]]   then seqlens[b] += n_b
// with every source read before any destination is written. Paged caches hold logical position
// p of sequence b at block block_table[b, p / page_size], slot p % page_size. Valid arguments:
// 0 <= n_b <= A, 0 <= L_b, L_b + n_b <= capacity, i <= accept_indices[b, i] < capacity - L_b
// (a tree path's node indices never fall behind their row) and blocks in [0, num_blocks) for
// every i < n_b; the kernel skips a sequence that breaks any of them (nothing of it is read or
// written, seqlens[b] stays), so it never leaves that sequence's own slots.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace medusa_kernels {

struct CompactKVParams {
  void* k;                          // [NL, B or NB, S or bs, Hkv, D], rows of row_bytes
  void* v;                          // same shape as k (strides may differ)
  int32_t* seqlens;                 // [B], advanced by accept_lengths in the same launch
  const void* accept_indices;       // [B, A] int32 or int64, unit stride along A
  const int32_t* accept_lengths;    // [B]
  const int32_t* block_table;       // [B, MB] or nullptr (dense cache)
  int32_t* counters;                // [>= B] zeroed; left zeroed after the launch
  int64_t k_stride_layer, k_stride_batch, k_stride_pos;  // bytes; batch = block when paged
  int64_t v_stride_layer, v_stride_batch, v_stride_pos;  // bytes
  int64_t idx_stride_batch;         // elements
  int64_t table_stride_batch;       // elements
  int64_t row_bytes;                // Hkv * D * element size
  int64_t capacity;                 // S (dense) or MB * page_size (paged)
  int32_t num_layers, batch, max_accept;  // NL, B, A
  int32_t page_size, num_blocks;    // paged only
  bool indices_int64;
};

// Launches the kernel on `stream`; returns cudaErrorInvalidValue for unsupported sizes
// (max_accept > 64, batch or num_layers > 65535, a paged capacity >= 2^31) and otherwise the
// launch's error. num_layers 0 still advances the lengths (of valid sequences).
cudaError_t launch_compact_kv(const CompactKVParams& p, cudaStream_t stream);

// Largest access width (16, 8, 4, 2; 1 = unsupported) the kernel can use for these pointers
// and strides.
int compact_kv_vector_bytes(const CompactKVParams& p);

}  // namespace medusa_kernels
