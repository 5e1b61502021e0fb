// Argument blocks and host launchers of pinpoint's CUDA kernels. Plain C++ (no CUDA
// headers), so bindings.cpp compiles with the host compiler alone. Pointers are raw device
// pointers from Python (tensor.data_ptr()); strides are in elements; dtype codes are
// 0 = fp32, 1 = bf16, 2 = fp16. Python validates everything before a launch; the launchers
// only check what the kernels themselves rely on, and throw std::runtime_error (a Python
// RuntimeError) on a failed launch. Launches are asynchronous on `stream` (a cudaStream_t
// passed as an integer, e.g. torch.cuda.current_stream().cuda_stream).
#pragma once
#include <cstdint>

namespace pinpoint {
namespace cuda {

struct AttentionParams {
  const void* q; const void* k; const void* v; void* out;  // out: [R, Tq, Hq*D], contiguous
  int dtype;                                               // of q, k, v and out
  int64_t R, Rk, Tq, Tk, Hq, Hkv, D;
  int64_t q_stride[3], k_stride[3], v_stride[3];           // (row, token, head); last dim unit
  const int64_t* kv_index;   // [R] (device)
  const uint8_t* head_mask;  // [R, Hq] or null
  const uint8_t* key_valid;  // [Rk, Tk] or null
  const void* patch;         // [P, Tq, Hq, D] or null (zero patch)
  int patch_dtype;
  int64_t patch_stride[4];
  const int64_t* patch_index;  // [R] (device; needed when patch is set)
  float scale;
  bool causal;
  // Filled in by the launcher:
  float scale_log2;  // scale * log2(e)
  bool vec;          // 16-byte cp.async loads allowed (alignment and strides permit)
  int variant;       // tile configuration, 0 = automatic (PINPOINT_CUDA_ATTN_VARIANT)
};

// Grouped Aᵀ·B over column blocks, C[s] (M x Nc, fp32, contiguous [S, M, Nc]):
//   C[s][m][c] = sum_n A[n, a_off[s] + m] * B[n, b_off[s] + c].
// a_off / b_off are device int64 [S] arrays, or null for all-zero offsets. `off_multiple`
// divides every offset (head_dim for head slices); it decides whether 16-byte loads apply.
struct GroupedAtbParams {
  const void* a; int a_dtype; int64_t a_row_stride, a_cols;
  const void* b; int b_dtype; int64_t b_row_stride, b_cols;
  int64_t N, S, M, Nc;
  const int64_t* a_off; const int64_t* b_off;
  int64_t off_multiple;
  float* c;
  bool vec;  // filled in by the launcher
};

// weight[slices of heads] += alpha * slices, in place; fp32 sum, one rounding.
struct SliceApplyParams {
  void* weight; int weight_dtype; int64_t row_stride, col_stride, out, in;
  const void* slices; int slices_dtype;  // contiguous [S, D, in] (rows) or [S, out, D] (cols)
  const int64_t* heads;                  // [S] (device)
  int64_t S, head_dim;
  bool by_rows;
  float alpha;
};

void head_patched_attention(AttentionParams p, int device, uintptr_t stream);
void grouped_atb(GroupedAtbParams p, int device, uintptr_t stream);
void head_slice_apply(SliceApplyParams p, int device, uintptr_t stream);

// Per-dtype instantiations of the tensor-core attention kernel (attention_bf16.cu,
// attention_fp16.cu), called by head_patched_attention after its checks.
void launch_attention_bf16(const AttentionParams& p, uintptr_t stream);
void launch_attention_fp16(const AttentionParams& p, uintptr_t stream);

constexpr int kMaxHeadDim = 256;

}  // namespace cuda
}  // namespace pinpoint
