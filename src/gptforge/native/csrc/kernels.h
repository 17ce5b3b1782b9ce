// The entry points one source of this library calls in another (each is also a torch op, see its source).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace gptforge {

// gemv.cpp: F.linear(x, w, bias) through the few-row kernels for up to 16 rows, at::linear beyond.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);

// The few-row products written into y (M <= 16 contiguous fp32 rows x (M, K), y (M, N)), allocating nothing: what
// gemv.cpp's `linear` (fp32 x, w fp32 / bf16 / fp16) and qgemv.cpp's int8_linear / int4_linear (int8 codes, scale,
// row sums; int4_pack tiles of n rows) compute for those rows, bit for bit. The step op's per-layer buffers.
void gemv_into(const float* x, int64_t M, const at::Tensor& w, const float* bias, float* y);
void int8_linear_into(const float* x, int64_t M, const at::Tensor& q, const at::Tensor& scale, const at::Tensor& wsum,
                      const float* bias, float* y);
void int4_linear_into(const float* x, int64_t M, const at::Tensor& packed, int64_t n, const float* bias, float* y);

// attention.cpp: one decode step's cache writes and attention over the cached keys and values.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kc,
                            const at::Tensor& vc, const at::Tensor& slots, const at::Tensor& mask);

// block.cpp: one Linear of a block, of any kind, as the block op multiplies it: `kind` is native/schema.py's
// LINEAR_KIND (0 float w; 1 int8 codes w, scale, aux = row sums, int8 activations; 2 int4_pack tiles w of n output
// rows; 3/4 weight-only int8 / int4 codes w, scale, aux = int4 minima: the kernels compress.quantize's QuantLinear
// calls for few rows). With `lora` (a MultiLoRALinear's B^T, w then the fused [W; A]) the result is the first
// lora.size(1) columns plus each row's update selected by `lora_mask` (B, 1, n R); no mask: the base's, a view.
at::Tensor block_linear(const at::Tensor& x, int64_t kind, const at::Tensor& w, const std::optional<at::Tensor>& bias,
                        const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& aux, int64_t n,
                        const std::optional<at::Tensor>& lora = std::nullopt,
                        const std::optional<at::Tensor>& lora_mask = std::nullopt);

}  // namespace gptforge
