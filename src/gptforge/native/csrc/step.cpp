// The CPU decode ops over the native KV cache: a whole step of one new token a row (token embedding, every block, the
// final norm and the head; B <= 16 rows: torch.ops.gptforge_step.decode) and one block (native.DecodeBlock's step or
// a short prompt's layer, any number of rows of T tokens: torch.ops.gptforge_decode.block). A layer's math is written once (`layer` below: norms, QK-norm,
// value embeddings, rotary, attention, MLP, residual adds) and the block op is that function on one layer. The
// products run on the few-row kernels (gemv.cpp, qgemv.cpp, through block.cpp's block_linear) and the attention on
// attention.cpp; everything between them is loops over the rows' few hundred floats, written into buffers allocated
// once per call, instead of ATen ops (each ~1-8 us of dispatch, allocation and TensorIterator setup for a few hundred
// multiply-adds), and a step is one call from Python instead of one per block plus the model's module calls.
//
// Why: at the 6-layer, 384-wide shape (weights in cache) a step's products take ~2 ms at one thread, and the block
// op's ATen ops (~110 us a block) with the Python around them (~0.2 ms) added another ~0.9 ms: llama.cpp's whole
// step is ~2.3 ms (docs/BENCHMARKS.md, "Per-token cost outside the products").
//
// The step op: fp32 and bf16 models, and fp32 models with quantized Linears (native/step.py checks); the block op:
// fp32, bf16 and fp16 blocks (native/layout.py checks). The math is the model's
// (model.py) in its dtype, and its results are PyTorch's to the bit (on this torch build: tests/test_generate.py,
// tests/test_gemv.py and tests/test_decode_block.py compare them with the Python block):
// the same ops in the same order, each bf16 result rounded where PyTorch's op rounds it; RMSNorm sums its squares
// in ATen's order; rotary is computed as model.apply_rotary does (no fused multiply-add) from tables the caller
// computed once with model.rotary_tables; LayerNorm, SiLU and GELU are ATen's own ops (one call each a layer).
// Each Linear is multiplied as the block op multiplies it (gptforge::block_linear, by its kind: float, or int8 /
// int4 codes), and so is the head (float, or a quantized one: tied to a quantized token table, or its own). A
// quantized token table's rows are dequantized here as compress/quantize.py's QuantizedMatrix.rows computes them.
// Another table or head stays the caller's (it embeds, or applies the head to the op's final-norm output).
//
// Tensors: `layers` holds, per layer, the fields `param_fields()` names and `kinds` each Linear's kind (the block
// op: one layer's, `params` and the layout's kinds); native/step.py and schema.py build them from schema.py's
// BlockParams and BlockLayout, and schema.check_schema checks the names against `param_fields()` and
// `layout_fields()`; a field a variant does not have is None. `globals`: see Global below.

#include <ATen/TensorOperators.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <ATen/ops/gelu.h>
#include <ATen/ops/layer_norm.h>
#include <ATen/ops/relu.h>
#include <ATen/ops/rms_norm.h>
#include <ATen/ops/silu.h>
#include <ATen/ops/square.h>
#include <ATen/ops/tanh.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <iterator>
#include <limits>
#include <optional>
#include <string>
#include <utility>
#include <tuple>
#include <vector>

#include "kernels.h"

namespace {

using Opts = c10::List<std::optional<at::Tensor>>;

// Per layer (the block op's `params`, the step op's `layers` per layer): schema.py's BlockParams, in its order: the
// norms, each Linear's weight and bias, QK-norm gains, the value-embedding gate, adapters' B^T where a Linear serves
// LoRA adapters per row, a quantized Linear's scale and aux.
enum Field : int64_t {
  kNorm1W, kNorm1B, kQkvW, kQkvB, kProjW, kProjB, kQNormW, kKNormW, kValueGate, kNorm2W, kNorm2B, kUpW, kUpB, kDownW,
  kDownB, kGateW, kGateB, kQkvL, kProjL, kUpL, kDownL, kGateL, kQkvS, kQkvA, kProjS, kProjA, kUpS, kUpA, kDownS,
  kDownA, kGateS, kGateA, kFields
};
const char* const kFieldNames[kFields] = {
    "norm1_weight", "norm1_bias", "qkv_weight", "qkv_bias", "proj_weight", "proj_bias", "q_norm_weight",
    "k_norm_weight", "value_gate", "norm2_weight", "norm2_bias", "up_weight", "up_bias", "down_weight", "down_bias",
    "gate_weight", "gate_bias", "qkv_lora", "proj_lora", "up_lora", "down_lora", "gate_lora", "qkv_scale", "qkv_aux",
    "proj_scale", "proj_aux", "up_scale", "up_aux", "down_scale", "down_aux", "gate_scale", "gate_aux"};
// The block op's layout (schema.py's BlockLayout): its shape, then each Linear's kind in Kind's order.
enum BlockLayout : int64_t { kBHead, kBKvHead, kBHeadDim, kBNorm, kBMlp, kBHidden, kBKinds, kBLayout = kBKinds + 5 };
const char* const kBlockLayoutNames[kBLayout] = {"n_head", "n_kv_head", "head_dim", "norm", "mlp", "hidden",
                                                 "qkv_kind", "proj_kind", "up_kind", "down_kind", "gate_kind"};
// Per layer, each Linear's kind (schema.py's LINEAR_KIND, what gptforge::block_linear multiplies), in this order.
enum Kind : int64_t { kQkvK, kProjK, kUpK, kDownK, kGateK, kKinds };
// The token table (None: the caller embeds, and hands x), the learned position table or None, the rotary tables
// (positions x Hd) or None, the final norm's weight and bias, the head's weight (None: the op returns the final
// norm's output, and the caller applies its head and soft-cap); then a quantized token table's scales and minima
// (int4) and the head's scale and aux as block_linear takes them (its kind in the layout).
// The token table is the model's dtype (its rows as they are), int8 codes (V, D) with fp32 scales (V,), or int4
// codes packed two a byte (uint8 (V, D/2), as compress/quantize.py's int4_codes packs them) with fp16 scales and
// minima (V, groups): its rows dequantized as QuantizedMatrix.rows computes them.
enum Global : int64_t { kTokEmb, kPosEmb, kCos, kSin, kNormFW, kNormFB, kHeadW, kTokS, kTokA, kHeadS, kHeadA,
                        kGlobals };
const char* const kGlobalNames[kGlobals] = {"tok_emb", "pos_emb", "rope_cos", "rope_sin", "norm_f_weight",
                                            "norm_f_bias", "head_weight", "tok_scale", "tok_aux", "head_scale",
                                            "head_aux"};
// layout: n_layer, n_head, n_kv_head, head_dim, norm (0 LayerNorm, 1 RMSNorm), mlp (0 GELU, 1 SwiGLU, 2 ReLU²),
// hidden (the MLP's width), the head's kind (block_linear's) and its output width.
enum Layout : int64_t { kNLayer, kNHead, kNKvHead, kHeadDim, kNorm, kMlp, kHidden, kHeadKind, kVocab, kLayout };

std::vector<std::string> layer_fields() { return {std::begin(kFieldNames), std::end(kFieldNames)}; }
std::vector<std::string> block_layout_fields() { return {std::begin(kBlockLayoutNames), std::end(kBlockLayoutNames)}; }
std::vector<std::string> global_fields() { return {std::begin(kGlobalNames), std::end(kGlobalNames)}; }

template <class T>
const T* ptr(const std::optional<at::Tensor>& t) { return t.has_value() ? t->data_ptr<T>() : nullptr; }

// v as the model's dtype holds it: bf16 rounds (to nearest even, as every bf16 op of the PyTorch path rounds its
// result), fp32 keeps it.
template <class T>
inline float as(float v) { return static_cast<float>(static_cast<T>(v)); }

// The sum of n floats in the order PyTorch's CPU sum reduces one contiguous row (ATen's SumKernel.cpp row_sum: 8-lane
// vectors, four interleaved partial sums, cascaded levels of 16 steps, then the lanes in order), so that RMSNorm's
// mean of squares equals PyTorch's to the bit (checked against torch on 64-4096 floats; another torch build may
// order its sum otherwise, and then the results differ in the last bits only).
float torch_row_sum(const float* x, int64_t n) {
  constexpr int W = 8, ILP = 4, LEVELS = 4;
  const int64_t vecs = n / W, size = vecs / ILP;
  int64_t log2 = 1;
  while ((int64_t{1} << log2) < size) ++log2;
  const int64_t power = std::max<int64_t>(4, log2 / LEVELS), step = int64_t{1} << power, mask = step - 1;
  float acc[LEVELS][ILP][W] = {};
  auto add = [](float* a, const float* v) {
    for (int w = 0; w < W; ++w) a[w] += v[w];
  };
  int64_t i = 0;
  while (i + step <= size) {
    for (int64_t j = 0; j < step; ++j, ++i)
      for (int k = 0; k < ILP; ++k) add(acc[0][k], x + (i * ILP + k) * W);
    for (int j = 1; j < LEVELS; ++j) {
      for (int k = 0; k < ILP; ++k) {
        add(acc[j][k], acc[j - 1][k]);
        std::fill(acc[j - 1][k], acc[j - 1][k] + W, 0.0f);
      }
      if ((i & (mask << (j * power))) != 0) break;
    }
  }
  for (; i < size; ++i)
    for (int k = 0; k < ILP; ++k) add(acc[0][k], x + (i * ILP + k) * W);
  for (int j = 1; j < LEVELS; ++j)
    for (int k = 0; k < ILP; ++k) add(acc[0][k], acc[j][k]);
  for (int64_t v = size * ILP; v < vecs; ++v) add(acc[0][0], x + v * W);
  for (int k = 1; k < ILP; ++k) add(acc[0][0], acc[0][k]);
  float total = 0;
  for (int64_t k = vecs * W; k < n; ++k) total += x[k];
  for (int w = 0; w < W; ++w) total += acc[0][0][w];
  return total;
}

// y = RMSNorm(x) over each of B rows of D as PyTorch's composite computes it in the model's dtype T: x * rsqrt(mean(x^2)
// + eps) in fp32, rounded to T, times w (rounded to T); bit for bit, through torch_row_sum.
template <class T>
void rms_rows(const float* x, T* y, int64_t B, int64_t D, const T* w, float eps) {
  std::vector<float> sq(D);
  for (int64_t r = 0; r < B; ++r, x += D, y += D) {
    for (int64_t i = 0; i < D; ++i) sq[i] = x[i] * x[i];
    const float inv = 1.0f / std::sqrt(torch_row_sum(sq.data(), D) / static_cast<float>(D) + eps);
    for (int64_t i = 0; i < D; ++i) y[i] = static_cast<T>(as<T>(x[i] * inv) * static_cast<float>(w[i]));
  }
}

// model.apply_rotary on `heads` heads of Hd at x: (x * cos + rotate_half(x) * sin) in fp32, rounded to T once, each
// product rounded on its own as PyTorch's separate mul and add round them (no contraction into a fused multiply-add).
template <class T>
__attribute__((optimize("fp-contract=off"))) void rotary(T* x, int64_t heads, int64_t Hd, const float* cos,
                                                            const float* sin) {
  const int64_t half = Hd / 2;
  for (int64_t h = 0; h < heads; ++h, x += Hd)
    for (int64_t i = 0; i < half; ++i) {
      const float x1 = static_cast<float>(x[i]), x2 = static_cast<float>(x[i + half]);
      const float a = x1 * cos[i], b = -x2 * sin[i];
      const float c = x2 * cos[i + half], d = x1 * sin[i + half];
      x[i] = static_cast<T>(a + b);
      x[i + half] = static_cast<T>(c + d);
    }
}

// The MLP's activation in place in a (n values of T): relu(a)^2, or for SwiGLU gate * a with the gate already
// through PyTorch's silu (at::silu, as GELU's at::gelu: their exp and tanh are PyTorch's own, so the results are
// its own); each product rounded to T as PyTorch's mul rounds it.
template <class T>
void activate(T* a, const T* gate, int64_t n, int64_t mlp) {
  if (mlp == 1) {
    for (int64_t i = 0; i < n; ++i) a[i] = static_cast<T>(static_cast<float>(gate[i]) * static_cast<float>(a[i]));
  } else if (mlp == 2) {
    for (int64_t i = 0; i < n; ++i) {
      const float u = std::max(static_cast<float>(a[i]), 0.0f);
      a[i] = static_cast<T>(u * u);
    }
  }
}

// x += y (B*D values; y of T), rounded to T as the residual add of the PyTorch path rounds.
template <class T>
void add_into(float* x, const at::Tensor& y, int64_t n) {
  const T* yp = y.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) x[i] = as<T>(x[i] + static_cast<float>(yp[i]));
}

struct Shape {
  int64_t L, H, Kh, Hd, mlp, hidden, head_kind, vocab;
  bool rms;
  float eps;
};

// A token table's tensors as the Global comment says, for D-wide rows of a model of dtype `dtype`.
void check_table(const at::Tensor& tab, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& aux,
                 int64_t D, at::ScalarType dtype) {
  const auto t = tab.scalar_type();
  TORCH_CHECK(tab.dim() == 2 && tab.is_contiguous(), "decode step: the token table must be contiguous (V, D)");
  if (t != at::kChar && t != at::kByte) {
    TORCH_CHECK(t == dtype && tab.size(1) == D, "decode step: the embedding must be of the norms' dtype and width");
    return;
  }
  TORCH_CHECK(dtype == at::kFloat && scale.has_value() && scale->is_contiguous() && scale->size(0) == tab.size(0),
              "decode step: a quantized token table needs one scale row per token, in an fp32 model");
  if (t == at::kChar) {
    TORCH_CHECK(tab.size(1) == D && scale->dim() == 1 && scale->scalar_type() == at::kFloat,
                "decode step: an int8 token table is (V, D) codes with fp32 scales (V,)");
    return;
  }
  const int64_t G = scale->dim() == 2 ? scale->size(1) : 0;
  TORCH_CHECK(G > 0 && D % G == 0 && (D / G) % 2 == 0 && tab.size(1) * 2 == D && scale->scalar_type() == at::kHalf &&
                  aux.has_value() && aux->sizes() == scale->sizes() && aux->scalar_type() == at::kHalf &&
                  aux->is_contiguous(),
              "decode step: an int4 token table is (V, D/2) packed codes with fp16 scales and minima (V, groups)");
}

// One token's row of the table in fp32, as the model's table module returns it: its own values, or
// QuantizedMatrix.rows' (int8 code * scale; int4 code * scale + minimum per group, the product and the sum each
// rounded as PyTorch's separate mul and add round them: no fused multiply-add).
template <class T>
__attribute__((optimize("fp-contract=off"))) void table_row(const at::Tensor& tab, const std::optional<at::Tensor>& scale,
                                                            const std::optional<at::Tensor>& aux, int64_t row, int64_t D,
                                                            float* out) {
  if (tab.scalar_type() == at::kChar) {
    const int8_t* q = tab.data_ptr<int8_t>() + row * D;
    const float s = scale->data_ptr<float>()[row];
    for (int64_t i = 0; i < D; ++i) out[i] = static_cast<float>(q[i]) * s;
  } else if (tab.scalar_type() == at::kByte) {  // group j's byte i: code i (high nibble), code i + g/2 (low)
    const int64_t G = scale->size(1), half = D / G / 2;
    const uint8_t* q = tab.data_ptr<uint8_t>() + row * (D / 2);
    const at::Half* sc = scale->data_ptr<at::Half>() + row * G;
    const at::Half* lo = aux->data_ptr<at::Half>() + row * G;
    for (int64_t j = 0; j < G; ++j, q += half, out += 2 * half) {
      const float sj = static_cast<float>(sc[j]), mj = static_cast<float>(lo[j]);
      for (int64_t i = 0; i < half; ++i) {
        out[i] = static_cast<float>(q[i] >> 4) * sj + mj;
        out[i + half] = static_cast<float>(q[i] & 15) * sj + mj;
      }
    }
  } else {
    const T* e = tab.data_ptr<T>() + row * D;
    for (int64_t i = 0; i < D; ++i) out[i] = static_cast<float>(e[i]);
  }
}

// x (B, D) = each row's embedding: the caller's x0, or its token's table row; plus its learned position's row,
// added in T (GPT.forward's x + pos_emb(pos)).
template <class T>
void embed(float* xp, const at::Tensor& ids, const int64_t* pos, const std::optional<at::Tensor>& x0,
           const Opts& globals, int64_t B, int64_t D, at::ScalarType dtype) {
  const std::optional<at::Tensor> tok = globals.get(kTokEmb), scale = globals.get(kTokS), aux = globals.get(kTokA);
  TORCH_CHECK(tok.has_value() != x0.has_value(), "decode step: give either the token table or the embedded x");
  const at::Tensor tab = tok.has_value() ? *tok : x0->reshape({B, D}).contiguous();
  check_table(tab, scale, aux, D, dtype);
  const std::optional<at::Tensor> pt = globals.get(kPosEmb);
  const T* pe = ptr<T>(pt);
  for (int64_t r = 0; r < B; ++r, xp += D) {
    const int64_t row = tok.has_value() ? ids.data_ptr<int64_t>()[r] : r;
    TORCH_CHECK(row >= 0 && row < tab.size(0), "decode step: token id ", row, " is outside the table's ", tab.size(0));
    table_row<T>(tab, scale, aux, row, D, xp);
    if (!pe) continue;
    TORCH_CHECK(pos[r] >= 0 && pos[r] < pt->size(0), "decode step: position ", pos[r], " is outside the table");
    for (int64_t i = 0; i < D; ++i) xp[i] = as<T>(xp[i] + static_cast<float>(pe[pos[r] * D + i]));
  }
}

using Opt = std::optional<at::Tensor>;

// One Linear's tensors of a layer (schema.py's names), its kind and output width.
struct Lin {
  int64_t kind, n;
  Opt w, b, scale, aux, lora;
};

// y (B, n) = one Linear on `in` (B, K, contiguous), as block_linear multiplies it. fp32 rows through the float,
// int8- and int4-dynamic kinds (no adapters) are written into `out` by kernels.h's raw entries, the same products
// without a tensor made or a dispatch (~3 us a product at the small shape); any other goes through block_linear.
at::Tensor linear_into(const at::Tensor& in, const Lin& l, const Opt& lora_mask, at::Tensor& out) {
  TORCH_CHECK(l.w.has_value(), "decode step: a Linear's weight is missing");
  const bool fp32_bias = !l.b.has_value() || (l.b->scalar_type() == at::kFloat && l.b->is_contiguous());
  const bool raw = in.scalar_type() == at::kFloat && in.size(0) <= 16 && !l.lora.has_value() && fp32_bias &&
                   ((l.kind == 0 && l.w->is_contiguous()) || (l.kind == 1 && l.scale && l.aux) || l.kind == 2);
  if (!raw)
    return gptforge::block_linear(in, l.kind, *l.w, l.b, l.scale, l.aux, l.n, l.lora, lora_mask).contiguous();
  const float* x = in.data_ptr<float>();
  const float* bias = l.b.has_value() ? l.b->data_ptr<float>() : nullptr;
  float* y = out.data_ptr<float>();
  const int64_t M = in.size(0);
  if (l.kind == 0) gptforge::gemv_into(x, M, *l.w, bias, y);
  else if (l.kind == 1) gptforge::int8_linear_into(x, M, *l.w, *l.scale, *l.aux, bias, y);
  else gptforge::int4_linear_into(x, M, *l.w, l.n, bias, y);
  return out;
}

// The step's state across layers: the residual stream x (fp32 holding T's values) and buffers of T allocated once
// per call: the normed rows, q|k|v side by side (with the attention's views of them), a Linear's output into the
// residual, the MLP's up and gate.
// The rows are tokens: B sequences of T new tokens each (a decode step: T = 1; the block op on a short prompt: T > 1).
struct Work {
  at::Tensor x, h, qkv, res, up, gate, q, k, v;
  int64_t T;

  Work(const Shape& s, int64_t rows, int64_t D, const at::TensorOptions& t, int64_t tokens = 1) : T(tokens) {
    const int64_t R = (s.H + 2 * s.Kh) * s.Hd;
    x = at::empty({rows, D}, t.dtype(at::kFloat));
    h = at::empty({rows, D}, t);
    res = at::empty({rows, D}, t);
    up = at::empty({rows, s.hidden}, t);
    gate = at::empty({rows, s.hidden}, t);
    views(at::empty({rows, R}, t), s);
  }

  // q (B, H, T, Hd), k and v (B, Kh, T, Hd) over qkv (B T, R)
  void views(const at::Tensor& fused, const Shape& s) {
    const int64_t B = fused.size(0) / T, R = fused.size(1);
    qkv = fused;
    q = qkv.as_strided({B, s.H, T, s.Hd}, {T * R, s.Hd, R, 1});
    k = qkv.as_strided({B, s.Kh, T, s.Hd}, {T * R, s.Hd, R, 1}, s.H * s.Hd);
    v = qkv.as_strided({B, s.Kh, T, s.Hd}, {T * R, s.Hd, R, 1}, (s.H + s.Kh) * s.Hd);
  }
};

// Everything a layer reads, gathered from the op's arguments.
struct Step {
  const Shape& s;
  const Opts& layers;
  at::IntArrayRef kinds;
  const std::vector<at::Tensor>& k_caches;
  const std::vector<at::Tensor>& v_caches;
  const at::Tensor& slots;
  const at::Tensor& mask;
  const Opt& lora_mask;
  const int64_t* rope;  // each row's row of cos and sin (the step op: its position)
  const float* cos;
  const float* sin;
  const Opt& ve;  // the block op's value-embedding rows (B, 1, K Hd) for its one layer, or None

  Opt f(int64_t l, Field i) const { return layers.get(l * kFields + i); }
  // layer l's Linear k (the lora fields follow the kinds' order), n its output width
  Lin lin(int64_t l, Kind k, Field w, Field b, Field sc, Field aux, int64_t n) const {
    return {kinds[l * kKinds + k], n, f(l, w), f(l, b), f(l, sc), f(l, aux), f(l, static_cast<Field>(kQkvL + k))};
  }
};

// The norm's output over the stream (B, D): RMSNorm in loops into h (ATen's sum order), LayerNorm ATen's own.
template <class T>
at::Tensor norm(const Shape& s, Work& w, const Opt& weight, const Opt& bias) {
  const int64_t B = w.x.size(0), D = w.x.size(1);
  if (!s.rms) return at::layer_norm(w.x.to(w.h.scalar_type()), {D}, weight, bias, s.eps);
  rms_rows<T>(w.x.data_ptr<float>(), w.h.data_ptr<T>(), B, D, ptr<T>(weight), s.eps);
  return w.h;
}

// v plus the gated value-embedding rows (each op rounded to T as PyTorch's mul and add round it: no fused
// multiply-add), in the qkv buffer (B, R) whose last Kh Hd columns are v.
template <class T>
__attribute__((optimize("fp-contract=off"))) void add_value_embedding(T* qkv, int64_t B, int64_t R, const at::Tensor& ve,
                                                                      const at::Tensor& gate) {
  const int64_t n = ve.numel() / B;
  const at::Tensor vc = ve.contiguous();
  const T* e = vc.data_ptr<T>();
  const float g = static_cast<float>(gate.data_ptr<T>()[0]);
  for (int64_t r = 0; r < B; ++r) {
    T* v = qkv + r * R + (R - n);
    for (int64_t i = 0; i < n; ++i) v[i] = static_cast<T>(static_cast<float>(v[i]) + as<T>(g * static_cast<float>(e[r * n + i])));
  }
}

// q, k and v as CausalSelfAttention.forward makes them before it attends, in the qkv buffer: v plus the gated value
// embedding, each head of q and of k through its RMSNorm (QK-norm: ATen's sum order, as the block norms), then
// rotary on q and k.
template <class T>
void prepare_qkv(const Step& st, int64_t l, Work& w) {
  const Shape& s = st.s;
  const int64_t B = w.qkv.size(0), H = s.H, Kh = s.Kh, Hd = s.Hd, R = (H + 2 * Kh) * Hd;
  T* qp = w.qkv.data_ptr<T>();
  if (st.ve.has_value()) {
    const Opt gate = st.f(l, kValueGate);
    TORCH_CHECK(gate.has_value() && st.ve->numel() == B * Kh * Hd && st.ve->scalar_type() == w.qkv.scalar_type(),
                "decode block: value embeddings need the layer's value_gate and (B, 1, K Hd) rows of its dtype");
    add_value_embedding<T>(qp, B, R, *st.ve, *gate);
  }
  std::vector<float> head(Hd);
  for (const auto& [field, first, heads] : {std::tuple{kQNormW, int64_t{0}, H}, std::tuple{kKNormW, H, Kh}}) {
    const Opt gain = st.f(l, field);
    for (int64_t r = 0; gain.has_value() && r < B; ++r)
      for (int64_t h = first; h < first + heads; ++h) {
        T* x = qp + r * R + h * Hd;
        for (int64_t i = 0; i < Hd; ++i) head[i] = static_cast<float>(x[i]);
        rms_rows<T>(head.data(), x, 1, Hd, gain->template data_ptr<T>(), s.eps);
      }
  }
  for (int64_t r = 0; st.cos && r < B; ++r)  // q's H heads and k's Kh are adjacent: one pass over H + Kh heads
    rotary<T>(qp + r * R, H + Kh, Hd, st.cos + st.rope[r] * Hd, st.sin + st.rope[r] * Hd);
}

// One layer: x + proj(attend(rotary(q), rotary(k), v)) over norm1(x), then x + down(act(up(norm2(x)))), on the
// B = w.x.size(0) rows (tokens) of the stream.
// Every op's result equals PyTorch's to the bit (RMSNorm sums in ATen's order; LayerNorm, SiLU and GELU are ATen's
// own ops, one call each), so with int8 activations every quantized product sees the block path's inputs exactly:
// a last-bit difference there moves a rounding step of its quantized copy.
template <class T>
void layer(const Step& st, int64_t l, Work& w) {
  const Shape& s = st.s;
  const int64_t B = w.x.size(0), D = w.x.size(1), H = s.H, Kh = s.Kh, Hd = s.Hd, R = (H + 2 * Kh) * Hd;
  float* xp = w.x.data_ptr<float>();
  const at::Tensor qkv = linear_into(norm<T>(s, w, st.f(l, kNorm1W), st.f(l, kNorm1B)),
                                     st.lin(l, kQkvK, kQkvW, kQkvB, kQkvS, kQkvA, R), st.lora_mask, w.qkv);
  if (!qkv.is_same(w.qkv)) w.views(qkv, s);  // block_linear's own result (its views; the buffers' from here on)
  prepare_qkv<T>(st, l, w);
  const at::Tensor y = gptforge::decode_attention(w.q, w.k, w.v, st.k_caches[l], st.v_caches[l], st.slots,
                                                  st.mask);  // (B / T, H, T, Hd)
  const at::Tensor heads = w.T == 1 ? y.view({B, H * Hd}) : y.transpose(1, 2).reshape({B, H * Hd});  // token rows
  add_into<T>(xp, linear_into(heads, st.lin(l, kProjK, kProjW, kProjB, kProjS, kProjA, D), st.lora_mask, w.res),
              B * D);

  const at::Tensor hn = norm<T>(s, w, st.f(l, kNorm2W), st.f(l, kNorm2B));
  at::Tensor a = linear_into(hn, st.lin(l, kUpK, kUpW, kUpB, kUpS, kUpA, s.hidden), st.lora_mask, w.up);
  if (s.mlp == 0) {
    at::gelu_(a, "tanh");
  } else {
    at::Tensor g = a;
    if (s.mlp == 1) {  // the gate through PyTorch's silu, in place
      g = linear_into(hn, st.lin(l, kGateK, kGateW, kGateB, kGateS, kGateA, s.hidden), st.lora_mask, w.gate);
      at::silu_(g);
    }
    activate<T>(a.data_ptr<T>(), g.data_ptr<T>(), a.numel(), s.mlp);
  }
  add_into<T>(xp, linear_into(a, st.lin(l, kDownK, kDownW, kDownB, kDownS, kDownA, D), st.lora_mask, w.res), B * D);
}

template <class T>
at::Tensor run(const Shape& s, const at::Tensor& ids, const at::Tensor& positions, const Opt& x0, const Opts& globals,
               const Opts& layers, at::IntArrayRef kinds, double softcap, const std::vector<at::Tensor>& k_caches,
               const std::vector<at::Tensor>& v_caches, const at::Tensor& slots, const at::Tensor& mask,
               const Opt& lora_mask) {
  const at::Tensor normf = *globals.get(kNormFW);
  const int64_t B = ids.size(0), D = normf.size(0);
  Work w(s, B, D, normf.options());
  const int64_t* pos = positions.data_ptr<int64_t>();
  embed<T>(w.x.data_ptr<float>(), ids, pos, x0, globals, B, D, normf.scalar_type());
  const Opt cos = globals.get(kCos), sin = globals.get(kSin);
  for (int64_t r = 0; cos && r < B; ++r)
    TORCH_CHECK(pos[r] >= 0 && pos[r] < cos->size(0), "decode step: position ", pos[r], " is outside the rotary tables");
  const Opt no_ve;
  const Step st{s, layers, kinds, k_caches, v_caches, slots, mask, lora_mask, pos, ptr<float>(cos), ptr<float>(sin),
                no_ve};
  for (int64_t l = 0; l < s.L; ++l) layer<T>(st, l, w);

  const at::Tensor hf = norm<T>(s, w, globals.get(kNormFW), globals.get(kNormFB));
  const Opt head = globals.get(kHeadW);
  if (!head.has_value()) return hf;  // (B, D): the caller's head
  at::Tensor logits = gptforge::block_linear(hf, s.head_kind, *head, std::nullopt, globals.get(kHeadS),
                                             globals.get(kHeadA), s.vocab);  // (B, V)
  if (softcap > 0) logits = at::tanh(logits / softcap) * softcap;  // SoftCap's ops (cap * tanh(logits / cap))
  return logits;
}

// One row's additive mask: 0 where the slot is valid and in first..slot, else -inf.
template <class T>
void fill_mask(T* m, const bool* valid, int64_t first, int64_t slot, int64_t end) {
  const T zero(0.0f), neg(-std::numeric_limits<float>::infinity());
  for (int64_t e = 0; e < end; ++e) m[e] = valid[e] && e >= first && e <= slot ? zero : neg;
}

// The cache bookkeeping of a decode step, done here rather than by KVCache.prepare's tensor ops (each costs 10-30 us
// from Python once the step has streamed the weights through the caches): mark each row's slot valid and build the
// additive mask (B, 1, 1, end) of the model's dtype over the first `end` slots. A row sees the valid slots up to its
// own (and within `window` of it when window > 0), and always its own slot: KVCache.prepare's rule for one token.
// slots: (1,) one slot for every row, (B,) each row's, or none: every row's is end - 1 (the static batch's); the
// result's second tensor is (B, 1), as attention takes.
std::pair<at::Tensor, at::Tensor> decode_mask(const at::Tensor& valid, const std::optional<at::Tensor>& slots, int64_t B,
                                              int64_t end, int64_t window, at::ScalarType dtype) {
  TORCH_CHECK(valid.dim() == 2 && valid.scalar_type() == at::kBool && valid.size(0) == B && valid.stride(1) == 1,
              "decode step: valid must be a (B, S) bool tensor with contiguous rows");
  TORCH_CHECK(!slots || (slots->dim() == 1 && slots->scalar_type() == at::kLong && (slots->size(0) == 1 ||
                                                                                     slots->size(0) == B)),
              "decode step: slots must be int64 (1,) or (B,), or None");
  const int64_t S = valid.size(1);
  TORCH_CHECK(end >= 1 && end <= S, "decode step: end ", end, " is outside the cache's 1..", S);
  at::Tensor rows = slots ? slots->expand({B}).contiguous().view({B, 1})
                          : at::full({B, 1}, end - 1, valid.options().dtype(at::kLong));
  const int64_t* sp = rows.data_ptr<int64_t>();
  bool* vp = valid.data_ptr<bool>();
  at::Tensor mask = at::empty({B, 1, 1, end}, valid.options().dtype(dtype));
  for (int64_t b = 0; b < B; ++b)  // every row checked before any is marked: a bad call changes nothing
    TORCH_CHECK(sp[b] >= 0 && sp[b] < end, "decode step: slot ", sp[b], " is outside the first ", end, " slots");
  for (int64_t b = 0; b < B; ++b) {
    const int64_t slot = sp[b];
    bool* v = vp + b * valid.stride(0);
    v[slot] = true;
    const int64_t first = window > 0 ? std::max<int64_t>(0, slot - window + 1) : 0;
    if (dtype == at::kFloat) fill_mask(mask.data_ptr<float>() + b * end, v, first, slot, end);
    else fill_mask(mask.data_ptr<c10::BFloat16>() + b * end, v, first, slot, end);
  }
  return {mask, rows};
}

// ids, positions and slots as the caller has them, (B,) or (B, 1) (a column of a (B, T) batch is strided): one new
// token a row, flattened here rather than by tensor ops from Python (~3 us each there).
at::Tensor flat(const at::Tensor& t) { return t.dim() == 1 && t.is_contiguous() ? t : t.reshape({-1}).contiguous(); }

at::Tensor decode_step(const at::Tensor& ids, const at::Tensor& positions, const std::optional<at::Tensor>& x,
                       const Opts& globals, const Opts& layers, at::IntArrayRef kinds, at::IntArrayRef layout, double eps,
                       double softcap, const std::vector<at::Tensor>& k_caches, const std::vector<at::Tensor>& v_caches,
                       const at::Tensor& valid, const std::optional<at::Tensor>& slot, int64_t end, int64_t window,
                       const std::optional<at::Tensor>& lora_mask) {
  TORCH_CHECK(layout.size() == kLayout, "decode step: layout must be (n_layer, n_head, n_kv_head, head_dim, norm, mlp, "
              "hidden, head_kind, vocab)");
  TORCH_CHECK(globals.size() == kGlobals, "decode step: expected ", kGlobals, " global tensors, got ", globals.size());
  const Shape s{layout[kNLayer], layout[kNHead], layout[kNKvHead], layout[kHeadDim], layout[kMlp], layout[kHidden],
                layout[kHeadKind], layout[kVocab], layout[kNorm] == 1, static_cast<float>(eps)};
  TORCH_CHECK(static_cast<int64_t>(layers.size()) == s.L * kFields && static_cast<int64_t>(kinds.size()) == s.L * kKinds,
              "decode step: expected ", s.L * kFields, " layer tensors and ", s.L * kKinds, " kinds, got ", layers.size(),
              " and ", kinds.size());
  TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == s.L && static_cast<int64_t>(v_caches.size()) == s.L,
              "decode step: one key and one value cache per layer");
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // frozen weights, inference only
  const at::Tensor id = flat(ids), pos = flat(positions);
  TORCH_CHECK(ids.dim() <= 2 && id.scalar_type() == at::kLong && pos.sizes() == id.sizes() &&
                  pos.scalar_type() == at::kLong, "decode step: ids and positions must be int64 (B,) or (B, 1)");
  TORCH_CHECK(id.size(0) >= 1 && id.size(0) <= 16, "decode step: 1 to 16 rows, got ", id.size(0));
  TORCH_CHECK(globals.get(kNormFW).has_value(), "decode step: the final norm's weight is required");
  const auto dtype = globals.get(kNormFW)->scalar_type();
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "decode step: fp32 or bf16 models, got ", dtype);
  const auto [mask, slots] = decode_mask(valid, slot ? Opt(flat(*slot)) : Opt(), id.size(0), end, window, dtype);
  if (dtype == at::kFloat)
    return run<float>(s, id, pos, x, globals, layers, kinds, softcap, k_caches, v_caches, slots, mask, lora_mask);
  return run<c10::BFloat16>(s, id, pos, x, globals, layers, kinds, softcap, k_caches, v_caches, slots, mask, lora_mask);
}

// The block op (native.DecodeBlock's step, or a short prompt's layer): one layer as the step op runs it, on x
// (B, T, D) of the model's dtype, returned in that dtype; cos and sin the tokens' rotary tables ((1, Hd) for every
// token, (T, Hd) per position, or (B, 1, T, Hd) each row's; model.rotary_tables of the positions), ve this layer's
// value-embedding rows (B, T, K Hd).
template <class T>
at::Tensor block(const Step& st, const at::Tensor& x) {
  const int64_t B = x.size(0), Tn = x.size(1), D = x.size(2);
  Work w(st.s, B * Tn, D, x.options(), Tn);
  w.x.copy_(x.reshape({B * Tn, D}));  // widened exactly: the stream holds T's values in fp32
  layer<T>(st, 0, w);
  return w.x.to(x.scalar_type()).view({B, Tn, D});
}

at::Tensor decode_block(const at::Tensor& x, const Opts& p, at::IntArrayRef layout, double eps, const at::Tensor& kc,
                        const at::Tensor& vc, const at::Tensor& slots, const at::Tensor& mask, const Opt& cos,
                        const Opt& sin, const Opt& ve, const Opt& lora_mask) {
  TORCH_CHECK(p.size() == kFields, "decode block: expected ", kFields, " parameters, got ", p.size());
  TORCH_CHECK(layout.size() == kBLayout, "decode block: layout must have ", kBLayout, " entries (schema.py's BlockLayout)");
  TORCH_CHECK(x.dim() == 3 && x.size(1) >= 1, "decode block: x must be (B, T, D): T new tokens a row");
  TORCH_CHECK(cos.has_value() == sin.has_value(), "decode block: rotary cos and sin come together");
  at::AutoDispatchBelowADInplaceOrView below_autograd;  // frozen weights, inference only
  const int64_t B = x.size(0), Tn = x.size(1), rows = B * Tn, Hd = layout[kBHeadDim];
  const Shape s{1, layout[kBHead], layout[kBKvHead], Hd, layout[kBMlp], layout[kBHidden], 0, 0, layout[kBNorm] == 1,
                static_cast<float>(eps)};
  at::Tensor c, sn;
  std::vector<int64_t> rope(rows, 0);  // each token's row of the tables
  if (cos.has_value()) {
    c = cos->to(at::kFloat).reshape({-1, Hd}).contiguous();
    sn = sin->to(at::kFloat).reshape({-1, Hd}).contiguous();
    const int64_t n = c.size(0);
    TORCH_CHECK(n == 1 || n == Tn || n == rows,
                "decode block: cos and sin must be (1, Hd), (T, Hd) or (B, 1, T, Hd)");
    for (int64_t r = 0; n > 1 && r < rows; ++r) rope[r] = n == rows ? r : r % Tn;
  }
  const std::vector<at::Tensor> kcs{kc}, vcs{vc};
  const Step st{s, p, layout.slice(kBKinds, kKinds), kcs, vcs, slots, mask, lora_mask, rope.data(),
                c.defined() ? c.data_ptr<float>() : nullptr, sn.defined() ? sn.data_ptr<float>() : nullptr, ve};
  switch (x.scalar_type()) {
    case at::kFloat: return block<float>(st, x);
    case at::kBFloat16: return block<c10::BFloat16>(st, x);
    case at::kHalf: return block<c10::Half>(st, x);
    default: TORCH_CHECK(false, "decode block: fp32, bf16 or fp16 blocks, got ", x.scalar_type());
  }
}

}  // namespace

TORCH_LIBRARY(gptforge_decode, m) {
  m.def("block(Tensor x, Tensor?[] params, int[] layout, float eps, Tensor(a!) k_cache, Tensor(b!) v_cache, "
        "Tensor slots, Tensor mask, Tensor? cos, Tensor? sin, Tensor? ve, Tensor? lora_mask=None) -> Tensor");
  m.def("param_fields() -> str[]", &layer_fields);
  m.def("layout_fields() -> str[]", &block_layout_fields);
}

TORCH_LIBRARY_IMPL(gptforge_decode, CPU, m) { m.impl("block", &decode_block); }

TORCH_LIBRARY(gptforge_step, m) {
  m.def("decode(Tensor ids, Tensor positions, Tensor? x, Tensor?[] globals, Tensor?[] layers, int[] kinds, int[] layout, "
        "float eps, float softcap, Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, Tensor(c!) valid, Tensor? slots, "
        "int end, int window, Tensor? lora_mask=None) -> Tensor");
  m.def("global_fields() -> str[]", &global_fields);
}

TORCH_LIBRARY_IMPL(gptforge_step, CPU, m) { m.impl("decode", &decode_step); }
