// Python bindings of medusa_kernels._C: argument checks at the boundary (CHECK_* macros name the
// argument), then the launchers in the .cu files. Value checks (lengths, indices, block ids) are
// done in Python (ops._backend.check_values: CPU tensors, or MEDUSA_KERNELS_CHECKS=1); without
// them the kernels skip the sequences whose values are invalid.
#include <optional>

#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/extension.h>

#include "compact_kv.h"

#define CHECK_CUDA(x) TORCH_CHECK((x).is_cuda(), #x " must be a CUDA tensor, got ", (x).device())
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_DTYPE(x, dtype) \
  TORCH_CHECK((x).scalar_type() == (dtype), #x " must have dtype ", (dtype), ", got ", (x).scalar_type())
#define CHECK_DIM(x, ...)                                                                 \
  do {                                                                                    \
    const auto d_ = (x).dim();                                                            \
    bool ok_ = false;                                                                     \
    for (int64_t want_ : {__VA_ARGS__}) ok_ = ok_ || d_ == want_;                         \
    TORCH_CHECK(ok_, #x " must have " #__VA_ARGS__ " dims, got shape ", (x).sizes());    \
  } while (0)
#define CHECK_SIZE(x, d, n)                                                                \
  TORCH_CHECK((x).size(d) == (n), #x " has shape ", (x).sizes(), ": dim ", (d),          \
              " must be ", (n))
#define CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " must be on ", (y).device(), ", got ", (x).device())
#define CHECK_ROWS_CONTIGUOUS(x)                                                          \
  TORCH_CHECK(((x).size(-1) <= 1 || (x).stride(-1) == 1) &&                               \
                  ((x).size(-2) <= 1 || (x).stride(-2) == (x).size(-1)),                  \
              #x " must have contiguous (Hkv, D) rows, got strides ", (x).strides())

namespace {

// k_cache, v_cache: [NL, B, S, Hkv, D] or [B, S, Hkv, D]; with block_table [B, MB] int32:
// [NL, NB, bs, Hkv, D] or [NB, bs, Hkv, D]. cache_seqlens [B] int32 (advanced in place),
// accept_indices [B, A] int32/int64, accept_lengths [B] int32, counters [>= B] int32 zeroed.
void compact_kv_cache(at::Tensor k_cache, at::Tensor v_cache, at::Tensor cache_seqlens,
                      at::Tensor accept_indices, at::Tensor accept_lengths,
                      std::optional<at::Tensor> block_table, at::Tensor counters) {
  CHECK_CUDA(k_cache);
  CHECK_DIM(k_cache, 4, 5);
  TORCH_CHECK(at::isFloatingType(k_cache.scalar_type()), "k_cache must be floating point, got ",
              k_cache.scalar_type());
  CHECK_ROWS_CONTIGUOUS(k_cache);
  CHECK_SAME_DEVICE(v_cache, k_cache);
  CHECK_DTYPE(v_cache, k_cache.scalar_type());
  TORCH_CHECK(v_cache.sizes() == k_cache.sizes(), "v_cache ", v_cache.sizes(),
              " must match k_cache ", k_cache.sizes());
  CHECK_ROWS_CONTIGUOUS(v_cache);
  const bool paged = block_table.has_value();
  const int64_t batch = paged ? block_table->size(0) : k_cache.size(-4);
  if (paged) {
    CHECK_SAME_DEVICE(*block_table, k_cache);
    CHECK_DIM(*block_table, 2);
    CHECK_DTYPE(*block_table, at::kInt);
    TORCH_CHECK(block_table->stride(1) == 1, "block_table must have unit stride along dim 1");
  }
  CHECK_SAME_DEVICE(cache_seqlens, k_cache);
  CHECK_DIM(cache_seqlens, 1);
  CHECK_DTYPE(cache_seqlens, at::kInt);
  CHECK_CONTIGUOUS(cache_seqlens);
  CHECK_SIZE(cache_seqlens, 0, batch);
  CHECK_SAME_DEVICE(accept_lengths, k_cache);
  CHECK_DIM(accept_lengths, 1);
  CHECK_DTYPE(accept_lengths, at::kInt);
  CHECK_CONTIGUOUS(accept_lengths);
  CHECK_SIZE(accept_lengths, 0, batch);
  CHECK_SAME_DEVICE(accept_indices, k_cache);
  CHECK_DIM(accept_indices, 2);
  TORCH_CHECK(accept_indices.scalar_type() == at::kInt || accept_indices.scalar_type() == at::kLong,
              "accept_indices must have dtype int32 or int64, got ", accept_indices.scalar_type());
  CHECK_SIZE(accept_indices, 0, batch);
  TORCH_CHECK(accept_indices.size(1) <= 1 || accept_indices.stride(1) == 1,
              "accept_indices must have unit stride along dim 1");
  TORCH_CHECK(accept_indices.size(1) <= 64, "accept_indices: at most 64 accepted tokens, got ",
              accept_indices.size(1));
  CHECK_SAME_DEVICE(counters, k_cache);
  CHECK_DTYPE(counters, at::kInt);
  CHECK_CONTIGUOUS(counters);
  TORCH_CHECK(counters.numel() >= batch, "counters must hold >= ", batch, " entries");

  const bool stacked = k_cache.dim() == 5;
  const int64_t es = k_cache.element_size();
  medusa_kernels::CompactKVParams p{};
  p.k = k_cache.data_ptr();
  p.v = v_cache.data_ptr();
  p.seqlens = cache_seqlens.data_ptr<int32_t>();
  p.accept_indices = accept_indices.data_ptr();
  p.accept_lengths = accept_lengths.data_ptr<int32_t>();
  p.block_table = paged ? block_table->data_ptr<int32_t>() : nullptr;
  p.counters = counters.data_ptr<int32_t>();
  p.k_stride_layer = stacked ? k_cache.stride(0) * es : 0;
  p.v_stride_layer = stacked ? v_cache.stride(0) * es : 0;
  p.k_stride_batch = k_cache.stride(-4) * es;
  p.v_stride_batch = v_cache.stride(-4) * es;
  p.k_stride_pos = k_cache.stride(-3) * es;
  p.v_stride_pos = v_cache.stride(-3) * es;
  p.idx_stride_batch = accept_indices.stride(0);
  p.table_stride_batch = paged ? block_table->stride(0) : 0;
  p.row_bytes = k_cache.size(-2) * k_cache.size(-1) * es;
  p.capacity = paged ? block_table->size(1) * k_cache.size(-3) : k_cache.size(-3);
  p.num_layers = stacked ? static_cast<int32_t>(k_cache.size(0)) : 1;
  p.batch = static_cast<int32_t>(batch);
  p.max_accept = static_cast<int32_t>(accept_indices.size(1));
  p.page_size = paged ? static_cast<int32_t>(k_cache.size(-3)) : 1;
  p.num_blocks = paged ? static_cast<int32_t>(k_cache.size(-4)) : 1;
  p.indices_int64 = accept_indices.scalar_type() == at::kLong;
  TORCH_CHECK(batch <= 65535 && p.num_layers <= 65535, "compact_kv_cache: B = ", batch,
              " and NL = ", p.num_layers, " must be <= 65535");
  TORCH_CHECK(!paged || p.capacity <= INT32_MAX, "block_table: max_pages * page_size = ",
              p.capacity, " must be < 2^31");
  if (batch == 0) return;

  const c10::cuda::CUDAGuard guard(k_cache.device());
  const cudaError_t err =
      medusa_kernels::launch_compact_kv(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "compact_kv_cache: launch failed: ", cudaGetErrorString(err));
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "medusa_kernels CUDA C++ kernels (csrc/)";
  m.def("compact_kv_cache", &compact_kv_cache,
        "In-place KV compaction of the accepted path, all layers, one launch",
        py::arg("k_cache"), py::arg("v_cache"), py::arg("cache_seqlens"),
        py::arg("accept_indices"), py::arg("accept_lengths"), py::arg("block_table"),
        py::arg("counters"));
}
