// The entry points one source of this library calls in another (each is also a torch op, see its source).
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>

namespace gptforge {

// gemv.cpp: F.linear(x, w, bias) through the few-row kernels for up to 16 rows, at::linear beyond.
at::Tensor linear(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& bias);

// attention.cpp: one decode step's cache writes and attention over the cached keys and values.
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& kc,
                            const at::Tensor& vc, const at::Tensor& slots, const at::Tensor& mask);

}  // namespace gptforge
