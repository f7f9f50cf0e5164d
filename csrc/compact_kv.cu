// In-place KV-cache compaction of the accepted tree path, all layers in one launch.
// Build: part of medusa_kernels._C (setup.py, CMakeLists.txt); alone: nvcc -O3 -c compact_kv.cu
// The reference (compact_kv_cache_ref) and the tests live in medusa_kernels/ops/compact_kv.py
// and python_tests/test_compact_kv.py.
//
// Grid (chunk, b, layer); a thread owns one 16-byte (or narrower) column of the Hkv * D row at
// positions L_b .. L_b + A of its layer, in K and in V; no other thread reads or writes it.
// First the block checks sequence b's arguments and puts the byte offsets of its accepted
// sources and destinations in shared memory (thread i takes rows i, i + blockDim, ...). A
// sequence with any invalid length, index or block (possible only when the host did not check
// the values) is skipped whole: nothing of it is read or written, its length stays. Then each
// thread moves its column in batches of kBatch rows: loads, then stores. Batches may run in
// order because tree-path indices never fall behind their row (accept_indices[b, i] >= i, which
// the check enforces): row i writes L_b + i, which no later row j reads (its source L_b +
// idx_j >= L_b + j > L_b + i), and earlier rows wrote only below L_b + i <= its own source.
// Registers are fixed (kBatch vectors of K and of V) whatever A: no spills. The last block of
// sequence b to finish (an atomic per-sequence counter) advances seqlens[b].
#include "compact_kv.h"

namespace medusa_kernels {
namespace {

constexpr int kMaxThreads = 256;
constexpr int kMaxAccept = 64;  // accepted tokens per sequence: tree depth + 1
constexpr int kBatch = 8;       // rows in flight per thread (Medusa accepts <= ~6 per step)

// Byte offsets of accepted row i of sequence b (source and destination, in K and in V), or
// false when that row is invalid: an index behind its row or past the capacity, or a block
// outside the cache. L and the row count are already checked (0 <= L, L + n <= capacity).
__device__ bool row_offsets(const CompactKVParams& p, int b, int64_t L, int i, int64_t* k_src,
                            int64_t* k_dst, int64_t* v_src, int64_t* v_dst) {
  const int64_t at = b * p.idx_stride_batch + i;
  const int64_t idx = p.indices_int64 ? static_cast<const int64_t*>(p.accept_indices)[at]
                                      : static_cast<const int32_t*>(p.accept_indices)[at];
  if (idx < i || idx >= p.capacity - L) return false;  // no overflow: capacity - L >= 0
  const int64_t src = L + idx, dst = L + i;
  int64_t src_row = b, src_col = src, dst_row = b, dst_col = dst;
  if (p.block_table != nullptr) {
    // 32-bit division (the launcher refuses paged capacities >= 2^31): a 64-bit one is a
    // subroutine call, whose saved registers spill
    const uint32_t page = static_cast<uint32_t>(p.page_size);
    const uint32_t src32 = static_cast<uint32_t>(src), dst32 = static_cast<uint32_t>(dst);
    const int32_t* table = p.block_table + b * p.table_stride_batch;
    src_row = table[src32 / page];
    dst_row = table[dst32 / page];
    src_col = src32 % page;
    dst_col = dst32 % page;
    if (src_row < 0 || src_row >= p.num_blocks || dst_row < 0 || dst_row >= p.num_blocks) {
      return false;
    }
  }
  *k_src = src_row * p.k_stride_batch + src_col * p.k_stride_pos;
  *k_dst = dst_row * p.k_stride_batch + dst_col * p.k_stride_pos;
  *v_src = src_row * p.v_stride_batch + src_col * p.v_stride_pos;
  *v_dst = dst_row * p.v_stride_batch + dst_col * p.v_stride_pos;
  return true;
}

template <typename VecT>
__global__ void __launch_bounds__(kMaxThreads) compact_kv_kernel(const CompactKVParams p) {
  __shared__ int64_t s_k_src[kMaxAccept], s_k_dst[kMaxAccept];
  __shared__ int64_t s_v_src[kMaxAccept], s_v_dst[kMaxAccept];
  const int b = blockIdx.y;
  const int layer = blockIdx.z;
  const int64_t col = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t row_vecs = p.row_bytes / static_cast<int64_t>(sizeof(VecT));
  const int64_t L = p.seqlens[b];
  const int n = p.accept_lengths[b];

  const bool lengths_ok = n >= 0 && n <= p.max_accept && L >= 0 && L + n <= p.capacity;
  bool bad_row = false;
  for (int i = threadIdx.x; lengths_ok && i < n; i += blockDim.x) {
    bad_row |= !row_offsets(p, b, L, i, &s_k_src[i], &s_k_dst[i], &s_v_src[i], &s_v_dst[i]);
  }
  // one barrier: the offsets are in shared memory and every thread has read seqlens[b]
  const bool ok = lengths_ok && !__syncthreads_or(bad_row);
  const int moved = ok && layer < p.num_layers ? n : 0;  // num_layers 0: a grid of one layer

  if (col < row_vecs && moved > 0) {
    const int64_t col_bytes = col * static_cast<int64_t>(sizeof(VecT));
    char* k = static_cast<char*>(p.k) + layer * p.k_stride_layer + col_bytes;
    char* v = static_cast<char*>(p.v) + layer * p.v_stride_layer + col_bytes;
    for (int i0 = 0; i0 < moved; i0 += kBatch) {
      VecT kx[kBatch], vx[kBatch];
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        if (i0 + j < moved) {
          kx[j] = *reinterpret_cast<const VecT*>(k + s_k_src[i0 + j]);
          vx[j] = *reinterpret_cast<const VecT*>(v + s_v_src[i0 + j]);
        }
      }
#pragma unroll
      for (int j = 0; j < kBatch; ++j) {
        if (i0 + j < moved) {
          *reinterpret_cast<VecT*>(k + s_k_dst[i0 + j]) = kx[j];
          *reinterpret_cast<VecT*>(v + s_v_dst[i0 + j]) = vx[j];
        }
      }
    }
  }

  // Every thread of this block read seqlens[b] before the barrier above; the block that
  // finishes last for sequence b (after every other block's read) writes the new length (a
  // skipped sequence keeps its own) and re-arms the counter.
  if (threadIdx.x == 0) {
    __threadfence();
    const int total = gridDim.x * gridDim.z;
    if (atomicAdd(&p.counters[b], 1) == total - 1) {
      if (ok) p.seqlens[b] = static_cast<int32_t>(L + n);
      p.counters[b] = 0;
    }
  }
}

template <typename VecT>
cudaError_t launch_vec(const CompactKVParams& p, cudaStream_t stream) {
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
  compact_kv_kernel<VecT><<<grid, threads, 0, stream>>>(p);
  return cudaGetLastError();
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
  if (p.max_accept < 0 || p.max_accept > kMaxAccept || p.batch > 65535 || p.num_layers < 0 ||
      p.num_layers > 65535 ||
      (p.block_table != nullptr && (p.page_size <= 0 || p.capacity > INT32_MAX))) {
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
