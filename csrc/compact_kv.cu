// In-place KV-cache compaction of the accepted tree path, all layers in one launch.
// Build: part of medusa_kernels._C (setup.py, CMakeLists.txt); alone: nvcc -O3 -c compact_kv.cu
// The reference (compact_kv_cache_ref) and the tests live in medusa_kernels/ops/compact_kv.py
// and python_tests/test_compact_kv.py.
//
// Grid (chunk, b, layer); a thread owns one 16-byte (or narrower) column of the Hkv * D row at
// positions L_b .. L_b + A of its layer, in K and in V. It loads the column of every accepted
// source into registers, then stores them to L_b + i: no other thread reads or writes that
// column, so the overlap of sources and destinations is safe without any barrier. A sequence with
// any invalid length, index or block (possible only when the host did not check the values) is
// skipped whole: nothing of it is read or written, its length stays. The last block of sequence
// b to finish (an atomic per-sequence counter) advances seqlens[b].
#include "compact_kv.h"

namespace medusa_kernels {
namespace {

constexpr int kMaxThreads = 256;

// Whether sequence b's accepted rows are all valid: i <= accept_indices[b, i] < capacity - L
// and (paged) blocks inside the cache. L and n are already checked (0 <= L, L + n <= capacity).
__device__ bool rows_valid(const CompactKVParams& p, int b, int64_t L, int n) {
  for (int i = 0; i < n; ++i) {
    const int64_t at = b * p.idx_stride_batch + i;
    const int64_t idx = p.indices_int64 ? static_cast<const int64_t*>(p.accept_indices)[at]
                                        : static_cast<const int32_t*>(p.accept_indices)[at];
    if (idx < i || idx >= p.capacity - L) return false;  // no overflow: capacity - L >= 0
    if (p.block_table != nullptr) {
      const int32_t* table = p.block_table + b * p.table_stride_batch;
      const int64_t src_row = table[(L + idx) / p.page_size];
      const int64_t dst_row = table[(L + i) / p.page_size];
      if (src_row < 0 || src_row >= p.num_blocks || dst_row < 0 || dst_row >= p.num_blocks) {
        return false;
      }
    }
  }
  return true;
}

template <typename VecT, int kMaxA>
__global__ void __launch_bounds__(kMaxThreads) compact_kv_kernel(const CompactKVParams p) {
  const int b = blockIdx.y;
  const int layer = blockIdx.z;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row_vecs = p.row_bytes / static_cast<int64_t>(sizeof(VecT));
  const int64_t L = p.seqlens[b];
  const int n_raw = p.accept_lengths[b];
  const bool ok = n_raw >= 0 && n_raw <= p.max_accept && L >= 0 && L + n_raw <= p.capacity &&
                  rows_valid(p, b, L, n_raw);
  const int n = ok && layer < p.num_layers ? n_raw : 0;  // num_layers 0: a grid of one layer

  if (col < row_vecs) {
    const int64_t col_bytes = col * static_cast<int64_t>(sizeof(VecT));
    char* k = static_cast<char*>(p.k) + layer * p.k_stride_layer + col_bytes;
    char* v = static_cast<char*>(p.v) + layer * p.v_stride_layer + col_bytes;
    VecT kx[kMaxA], vx[kMaxA];
    int64_t k_dst[kMaxA], v_dst[kMaxA];
    bool ok[kMaxA];
#pragma unroll
    for (int i = 0; i < kMaxA; ++i) {
      ok[i] = false;
      if (i < n) {
        const int64_t at = b * p.idx_stride_batch + i;
        const int64_t idx = p.indices_int64
                                ? static_cast<const int64_t*>(p.accept_indices)[at]
                                : static_cast<const int32_t*>(p.accept_indices)[at];
        const int64_t src = L + idx, dst = L + i;
        int64_t src_row = b, src_col = src, dst_row = b, dst_col = dst;
        if (p.block_table != nullptr) {
          const int32_t* table = p.block_table + b * p.table_stride_batch;
          src_row = table[src / p.page_size];
          dst_row = table[dst / p.page_size];
          src_col = src % p.page_size;
          dst_col = dst % p.page_size;
        }
        {
          kx[i] = *reinterpret_cast<const VecT*>(k + src_row * p.k_stride_batch +
                                                 src_col * p.k_stride_pos);
          vx[i] = *reinterpret_cast<const VecT*>(v + src_row * p.v_stride_batch +
                                                 src_col * p.v_stride_pos);
          k_dst[i] = dst_row * p.k_stride_batch + dst_col * p.k_stride_pos;
          v_dst[i] = dst_row * p.v_stride_batch + dst_col * p.v_stride_pos;
          ok[i] = true;
        }
      }
    }
    // every load of this thread is issued above, every store below (program order)
#pragma unroll
    for (int i = 0; i < kMaxA; ++i) {
      if (ok[i]) {
        *reinterpret_cast<VecT*>(k + k_dst[i]) = kx[i];
        *reinterpret_cast<VecT*>(v + v_dst[i]) = vx[i];
      }
    }
  }

  // All threads of this block have read seqlens[b]; the block that finishes last for sequence b
  // (after every other block's read) writes the new length and re-arms the counter.
  __syncthreads();
  if (threadIdx.x == 0) {
    __threadfence();
    const int total = gridDim.x * gridDim.z;
    if (atomicAdd(&p.counters[b], 1) == total - 1) {
      if (ok) p.seqlens[b] = static_cast<int32_t>(L + n_raw);
      p.counters[b] = 0;
    }
  }
}

template <typename VecT, int kMaxA>
cudaError_t launch_with(const CompactKVParams& p, cudaStream_t stream) {
  const int64_t row_vecs = p.row_bytes / static_cast<int64_t>(sizeof(VecT));
  // Small blocks, many of them: the op is latency bound (a few KiB per layer).
  int threads = kMaxThreads;
  auto chunks = [&](int t) { return row_vecs > 0 ? (row_vecs + t - 1) / t : int64_t{1}; };
  const int64_t layers = p.num_layers > 0 ? p.num_layers : 1;  // lengths advance even so
  while (threads > 32 &&
         (row_vecs <= threads / 2 || layers * p.batch * chunks(threads) < 512)) {
    threads /= 2;
  }
  const dim3 grid(static_cast<unsigned>(chunks(threads)), p.batch, static_cast<unsigned>(layers));
  compact_kv_kernel<VecT, kMaxA><<<grid, threads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename VecT>
cudaError_t launch_vec(const CompactKVParams& p, cudaStream_t stream) {
  if (p.max_accept <= 8) return launch_with<VecT, 8>(p, stream);
  if (p.max_accept <= 16) return launch_with<VecT, 16>(p, stream);
  if (p.max_accept <= 32) return launch_with<VecT, 32>(p, stream);
  return launch_with<VecT, 64>(p, stream);
}

}  // namespace

int compact_kv_vector_bytes(const CompactKVParams& p) {
  const uint64_t parts[] = {
      reinterpret_cast<uintptr_t>(p.k), reinterpret_cast<uintptr_t>(p.v),
      static_cast<uint64_t>(p.k_stride_layer), static_cast<uint64_t>(p.k_stride_batch),
      static_cast<uint64_t>(p.k_stride_pos), static_cast<uint64_t>(p.v_stride_layer),
      static_cast<uint64_t>(p.v_stride_batch), static_cast<uint64_t>(p.v_stride_pos),
      static_cast<uint64_t>(p.row_bytes)};
  uint64_t bits = 16;
  for (uint64_t x : parts) bits |= x;
  return static_cast<int>(bits & (~bits + 1));  // lowest set bit, at most 16
}

cudaError_t launch_compact_kv(const CompactKVParams& p, cudaStream_t stream) {
  if (p.batch <= 0) return cudaSuccess;
  if (p.max_accept < 0 || p.max_accept > 64 || p.batch > 65535 || p.num_layers < 0 ||
      p.num_layers > 65535 || (p.block_table != nullptr && p.page_size <= 0)) {
    return cudaErrorInvalidValue;
  }
  switch (compact_kv_vector_bytes(p)) {
    case 16: return launch_vec<uint4>(p, stream);
    case 8: return launch_vec<uint2>(p, stream);
    case 4: return launch_vec<uint32_t>(p, stream);
    case 2: return launch_vec<uint16_t>(p, stream);
    default: return cudaErrorMisalignedAddress;  // 1-byte elements are not supported
  }
}

}  // namespace medusa_kernels
