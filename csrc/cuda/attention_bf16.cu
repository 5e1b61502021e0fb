// bf16 instantiations of the tensor-core attention kernel (split from attention.cu so the
// kernel variants compile in parallel).
#include "attention_kernel.cuh"

namespace pinpoint {
namespace cuda {

void launch_attention_bf16(const AttentionParams& p, uintptr_t stream) {
  launch_attention_tc<kBF16>(p, stream, p.variant);
}

}  // namespace cuda
}  // namespace pinpoint
