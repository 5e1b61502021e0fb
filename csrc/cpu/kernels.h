// Argument blocks for the CPU kernels. Pointers are raw data pointers handed over from
// Python (tensor.data_ptr()); strides are in elements. Python validates everything first.
#pragma once
#include <cstdint>
#include <vector>

namespace pinpoint {

struct AttentionArgs {
  const void* q; const void* k; const void* v; void* out;  // out: [R, Tq, Hq*D], contiguous
  int dtype;                                               // of q, k, v and out
  int64_t R, Rk, Tq, Tk, Hq, Hkv, D;
  int64_t q_stride[3], k_stride[3], v_stride[3];           // (row, token, head); last dim unit
  const void* kv_index;     // int64 [R]
  const void* head_mask;    // uint8 [R, Hq] or null
  const void* key_valid;    // uint8 [Rk, Tk] or null
  const void* patch;        // [P, Tq, Hq, D] or null (zero patch)
  int patch_dtype;
  int64_t patch_stride[4];
  const void* patch_index;  // int64 [R] (needed when patch is set)
  float scale;
  bool causal;
  int n_threads;
};

// Grouped Aᵀ·B over column blocks: C[s] (M x Nc, fp32, contiguous)
//   C[s][m][c] = sum_n A[n, a_off[s] + m] * B[n, b_off[s] + c].
// Head-slice gradients are this with A = dY and B = X (rows) or Z (cols).
struct GroupedAtbArgs {
  const void* a; int a_dtype; int64_t a_row_stride, a_cols;
  const void* b; int b_dtype; int64_t b_row_stride, b_cols;
  int64_t N, S, M, Nc;
  const int64_t* a_off; const int64_t* b_off;  // [S]
  float* c;
  int n_threads;
};

// weight[slices of `heads`] += alpha * slices, in place; fp32 sum, one rounding.
struct SliceApplyArgs {
  void* weight; int weight_dtype; int64_t row_stride, col_stride, out, in;
  const void* slices; int slices_dtype;  // contiguous [S, D, in] (rows) or [S, out, D] (cols)
  std::vector<int64_t> heads; int64_t head_dim; bool by_rows; float alpha;
  int n_threads;
};

void head_patched_attention_cpu(const AttentionArgs& args);
void grouped_atb_cpu(const GroupedAtbArgs& args);
void head_slice_apply_cpu(const SliceApplyArgs& args);

}  // namespace pinpoint
