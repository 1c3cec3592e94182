// CPU kernels for FLix in float32, compiled on the user's machine by flix.cpu_kernels:
// - lowrank_forward / lowrank_backward, the adapters' rank-r arithmetic of flix.layer. At
//   rank ~6 torch's batched matmuls run far below the machine's FMA rate and read the output
//   gradient twice; here each example's rows are worked through in tiles of TILE tokens that
//   stay in L2 while the bank rows stay in L1.
// - sparse_adamw_, flix.optim's update of a bank's touched rows in one pass instead of about
//   twenty small ops per bank.
// - rms_norm_forward / rms_norm_backward and gated_forward / gated_backward, the frozen model's
//   RMSNorm and gated MLP activation (flix.fused) in one pass each way instead of several
//   small ops over the activations.
//
// Shapes of the rank-r part: x (n, din) and grad (n, dout) hold g examples of n / g tokens
// each (or, for packed rows, of the lengths given by bounds); a (g, r, din) and b (g, r, dout) are each example's gathered bank rows; h = x a^T is
// (n, r).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

#ifdef __AVX512F__
typedef float vf __attribute__((vector_size(64)));  // one AVX-512 register
constexpr int64_t W = 16;                          // floats per vf; widths must be multiples of it
#else
// One AVX2 register: with 64-byte vectors on AVX2 each took two of its 16 registers and the
// register blocks below spilled (backward 4-7x slower than torch's ops on an AVX2 EPYC).
typedef float vf __attribute__((vector_size(32)));
constexpr int64_t W = 8;
#endif
constexpr int64_t WIDTHS = 16;  // widths must be multiples of 16 whatever W is (flix.kernels.WIDTH)
constexpr int64_t TILE = 32;                       // tokens per tile: 32 x 2048 floats (256 KiB) stay in L2
constexpr int64_t CB = 256;                        // columns per block of bank rows copied contiguous (L1)
constexpr int MAX_RANK = 16;
// Register blocks are sized so that their accumulators, the vectors they load and one
// broadcast fit the 16 AVX2 registers: with the whole rank in one block (4 tokens x 6 rows
// in dots at rank 6, more at higher ranks) they spilled to the stack.
constexpr int KB = 6;                              // bank rows per block in dots and outer
constexpr int JV = WIDTHS / W;                     // vectors of columns per block in combine and outer
constexpr int TB = 6;                              // token rows per block in combine (2 in dots)
#define UNROLL _Pragma("GCC unroll 16")

inline vf load(const float* p) { vf v; __builtin_memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
inline float hsum(vf v) { float s = 0; for (int i = 0; i < W; ++i) s += v[i]; return s; }

// Copies columns [c0, c1) of the R rows of m (d apart) into mb (CB apart): bank rows 2^k floats
// apart (widths 1024, 2048) would otherwise fall in the same few L1 sets.
template <int R>
inline void pack_rows(const float* m, int64_t d, int64_t c0, int64_t c1, float* mb) {
  for (int k = 0; k < R; ++k) std::copy(m + k * d + c0, m + k * d + c1, mb + k * CB);
}

// part[i * MAX_RANK + k] += rows[i] * mb[k] (vector partial dot products) over `cols` columns,
// for T rows and the K packed bank rows mb (CB apart)
template <int T, int K>
inline void dots_block(const float* rows, int64_t ld, const float* mb, int64_t cols, vf* part) {
  vf acc[T][K];
  UNROLL for (int i = 0; i < T; ++i) UNROLL for (int k = 0; k < K; ++k) acc[i][k] = part[i * MAX_RANK + k];
  for (int64_t j = 0; j < cols; j += W) {
    vf v[T];
    UNROLL for (int i = 0; i < T; ++i) v[i] = load(rows + i * ld + j);
    UNROLL for (int k = 0; k < K; ++k) {
      const vf mk = load(mb + k * CB + j);
      UNROLL for (int i = 0; i < T; ++i) acc[i][k] += v[i] * mk;
    }
  }
  UNROLL for (int i = 0; i < T; ++i) UNROLL for (int k = 0; k < K; ++k) part[i * MAX_RANK + k] = acc[i][k];
}

// dots_block over all R bank rows, KB at a time
template <int T, int R>
inline void dots_rows(const float* rows, int64_t ld, const float* mb, int64_t cols, vf* part) {
  constexpr int K = R < KB ? R : KB;
  int k = 0;
  for (; k + K <= R; k += K) dots_block<T, K>(rows, ld, mb + k * CB, cols, part + k);
  if constexpr (R % K != 0) dots_block<T, R % K>(rows, ld, mb + k * CB, cols, part + k);
}

// out[t * R + k] = scale * <rows[t], m[k]> for n <= TILE rows (ld apart) and the R rows of m (d wide)
template <int R>
void dots(const float* rows, int64_t ld, int64_t n, const float* m, int64_t d, float scale, float* out) {
  vf part[TILE][MAX_RANK] = {};
  alignas(64) float mb[R * CB];
  for (int64_t c0 = 0; c0 < d; c0 += CB) {
    const int64_t c1 = std::min(d, c0 + CB);
    pack_rows<R>(m, d, c0, c1, mb);
    int64_t t = 0;
    for (; t + 2 <= n; t += 2) dots_rows<2, R>(rows + t * ld + c0, ld, mb, c1 - c0, part[t]);
    if (t < n) dots_rows<1, R>(rows + t * ld + c0, ld, mb, c1 - c0, part[t]);
  }
  for (int64_t t = 0; t < n; ++t)
    for (int k = 0; k < R; ++k) out[t * R + k] = scale * hsum(part[t][k]);
}

// out[t] = sum_k c[t * R + k] * mb[k] over `cols` columns for T rows: JV vectors at a time
template <int T, int R>
inline void combine_block(const float* c, const float* mb, int64_t cols, float* out, int64_t ld) {
  for (int64_t j = 0; j < cols; j += JV * W) {
    vf acc[T][JV] = {};
    UNROLL for (int k = 0; k < R; ++k) {
      vf mk[JV];
      UNROLL for (int q = 0; q < JV; ++q) mk[q] = load(mb + k * CB + j + q * W);
      UNROLL for (int i = 0; i < T; ++i) {
        const float ci = c[i * R + k];
        UNROLL for (int q = 0; q < JV; ++q) acc[i][q] += ci * mk[q];
      }
    }
    UNROLL for (int i = 0; i < T; ++i) UNROLL for (int q = 0; q < JV; ++q) store(out + i * ld + j + q * W, acc[i][q]);
  }
}

// out[t] = sum_k c[t * R + k] * m[k] for n rows (ld apart) of the width d of m
template <int R>
void combine(const float* c, int64_t n, const float* m, int64_t d, float* out, int64_t ld) {
  alignas(64) float mb[R * CB];
  for (int64_t c0 = 0; c0 < d; c0 += CB) {
    const int64_t c1 = std::min(d, c0 + CB);
    pack_rows<R>(m, d, c0, c1, mb);
    int64_t t = 0;
    for (; t + TB <= n; t += TB) combine_block<TB, R>(c + t * R, mb, c1 - c0, out + t * ld + c0, ld);
    for (; t < n; ++t) combine_block<1, R>(c + t * R, mb, c1 - c0, out + t * ld + c0, ld);
  }
}

// acc[k] += sum_t c[t * R + k] * rows[t] for the K rows k0 .. k0 + K of acc (d wide), JV
// vectors of columns at a time
template <int R, int K>
inline void outer_block(const float* c, int k0, const float* rows, int64_t ld, int64_t n, int64_t d, float* acc) {
  for (int64_t j = 0; j < d; j += JV * W) {
    vf s[K][JV];
    UNROLL for (int k = 0; k < K; ++k) UNROLL for (int q = 0; q < JV; ++q) s[k][q] = load(acc + (k0 + k) * d + j + q * W);
    for (int64_t t = 0; t < n; ++t) {
      vf v[JV];
      UNROLL for (int q = 0; q < JV; ++q) v[q] = load(rows + t * ld + j + q * W);
      UNROLL for (int k = 0; k < K; ++k) {
        const float ck = c[t * R + k0 + k];
        UNROLL for (int q = 0; q < JV; ++q) s[k][q] += ck * v[q];
      }
    }
    UNROLL for (int k = 0; k < K; ++k) UNROLL for (int q = 0; q < JV; ++q) store(acc + (k0 + k) * d + j + q * W, s[k][q]);
  }
}

// acc[k] += sum_t c[t * R + k] * rows[t] over n rows (ld apart) of width d; acc is (R, d)
template <int R>
void outer(const float* c, const float* rows, int64_t ld, int64_t n, int64_t d, float* acc) {
  constexpr int K = R < KB ? R : KB;
  int k = 0;
  for (; k + K <= R; k += K) outer_block<R, K>(c, k, rows, ld, n, d, acc);
  if constexpr (R % K != 0) outer_block<R, R % K>(c, k, rows, ld, n, d, acc);
}

// The unit of parallel work: a range of one example's tokens. An example is split only when
// there are fewer examples than threads; each chunk sums its own bank gradients.
struct Chunks {
  int64_t g, tokens, splits;
  Chunks(int64_t g_, int64_t n) : g(g_), tokens(n / g_) {
    const int64_t threads = at::get_num_threads();
    splits = g >= threads ? 1 : std::clamp<int64_t>((2 * threads + g - 1) / g, 1, std::max<int64_t>(1, tokens / TILE));
  }
  int64_t count() const { return g * splits; }
  int64_t example(int64_t c) const { return c / splits; }
  int64_t begin(int64_t c) const { return example(c) * tokens + (c % splits) * tokens / splits; }
  int64_t end(int64_t c) const { return example(c) * tokens + (c % splits + 1) * tokens / splits; }
};

// Packed rows: examples of any length one after another (bounds[e] .. bounds[e + 1] are example
// e's tokens). Long examples are cut so that every thread gets work; each piece sums its own
// bank gradients, added to its example's afterwards.
struct Segments {
  std::vector<int64_t> first, last, owner;
  explicit Segments(const torch::Tensor& bounds) {
    const int64_t* at = bounds.data_ptr<int64_t>();
    const int64_t examples = bounds.numel() - 1, n = at[examples];
    const int64_t piece = std::max<int64_t>(TILE, n / (4 * at::get_num_threads()) + 1);
    for (int64_t e = 0; e < examples; ++e)
      for (int64_t t = at[e]; t < at[e + 1]; t += piece) {
        first.push_back(t);
        last.push_back(std::min(at[e + 1], t + piece));
        owner.push_back(e);
      }
  }
  int64_t count() const { return static_cast<int64_t>(first.size()); }
  int64_t example(int64_t c) const { return owner[c]; }
  int64_t begin(int64_t c) const { return first[c]; }
  int64_t end(int64_t c) const { return last[c]; }
};

template <int R, class Chunking>
void forward_rank(const float* x, const float* a, const float* b, float scaling, float* h, float* update,
                  int64_t din, int64_t dout, const Chunking& ch) {
  at::parallel_for(0, ch.count(), 1, [&](int64_t first, int64_t last) {
    float hs[TILE * R];
    for (int64_t c = first; c < last; ++c) {
      const int64_t e = ch.example(c), end = ch.end(c);
      for (int64_t t = ch.begin(c); t < end; t += TILE) {
        const int64_t n = std::min(TILE, end - t);
        dots<R>(x + t * din, din, n, a + e * R * din, din, 1.f, h + t * R);
        for (int64_t i = 0; i < n * R; ++i) hs[i] = scaling * h[t * R + i];
        combine<R>(hs, n, b + e * R * dout, dout, update + t * dout, dout);
      }
    }
  });
}

template <int R, class Chunking>
void backward_rank(const float* grad, const float* x, const float* a, const float* b, const float* h, float scaling,
                   float* grad_h, float* grad_x, float* grad_a, float* grad_b, int64_t din, int64_t dout, const Chunking& ch) {
  at::parallel_for(0, ch.count(), 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      const int64_t e = ch.example(c), end = ch.end(c);
      for (int64_t t = ch.begin(c); t < end; t += TILE) {
        const int64_t n = std::min(TILE, end - t);
        // grad_h and grad_b from the same tile of grad, the second read from L2
        dots<R>(grad + t * dout, dout, n, b + e * R * dout, dout, scaling, grad_h + t * R);
        outer<R>(h + t * R, grad + t * dout, dout, n, dout, grad_b + c * R * dout);
        if (grad_x) combine<R>(grad_h + t * R, n, a + e * R * din, din, grad_x + t * din, din);
        outer<R>(grad_h + t * R, x + t * din, din, n, din, grad_a + c * R * din);
      }
    }
  });
}

void check(const torch::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == torch::kFloat32 && t.is_contiguous(),
              "flix cpu_kernels: ", name, " must be a contiguous float32 CPU tensor");
}

void check_shapes(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& b, const c10::optional<torch::Tensor>& bounds) {
  check(x, "x"); check(a, "a"); check(b, "b");
  TORCH_CHECK(x.dim() == 2 && a.dim() == 3 && b.dim() == 3 && a.size(0) == b.size(0) && a.size(1) == b.size(1) &&
                  a.size(2) == x.size(1) && a.size(0) > 0,
              "flix cpu_kernels: x (n, din), a (g, r, din), b (g, r, dout) with g > 0");
  TORCH_CHECK(a.size(1) >= 1 && a.size(1) <= MAX_RANK && x.size(1) % WIDTHS == 0 && b.size(2) % WIDTHS == 0,
              "flix cpu_kernels: rank 1..", MAX_RANK, " and widths that are multiples of ", WIDTHS);
  if (!bounds) {
    TORCH_CHECK(x.size(0) % a.size(0) == 0, "flix cpu_kernels: n a multiple of g (or example bounds given)");
    return;
  }
  TORCH_CHECK(bounds->scalar_type() == torch::kLong && bounds->is_contiguous() && bounds->device().is_cpu() &&
                  bounds->numel() == a.size(0) + 1,
              "flix cpu_kernels: bounds, g + 1 int64 offsets on CPU");
  const int64_t* at = bounds->data_ptr<int64_t>();
  bool ordered = at[0] == 0 && at[a.size(0)] == x.size(0);
  for (int64_t e = 0; e < a.size(0); ++e) ordered = ordered && at[e] <= at[e + 1];
  TORCH_CHECK(ordered, "flix cpu_kernels: bounds must rise from 0 to n");
}

#define FLIX_RANKS(X) X(1) X(2) X(3) X(4) X(5) X(6) X(7) X(8) X(9) X(10) X(11) X(12) X(13) X(14) X(15) X(16)

template <class Chunking>
void forward_any(const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& b, float scaling, torch::Tensor& h,
                 torch::Tensor& update, const Chunking& ch) {
  const int64_t din = x.size(1), dout = b.size(2);
  switch (a.size(1)) {
#define CASE(R)                                                                                                         \
  case R:                                                                                                               \
    forward_rank<R>(x.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(), scaling, h.data_ptr<float>(),        \
                    update.data_ptr<float>(), din, dout, ch);                                                           \
    break;
    FLIX_RANKS(CASE)
#undef CASE
  }
}

template <class Chunking>
void backward_any(const torch::Tensor& grad, const torch::Tensor& x, const torch::Tensor& a, const torch::Tensor& b,
                  const torch::Tensor& h, float scaling, torch::Tensor& grad_h, torch::Tensor& grad_x, torch::Tensor& grad_a,
                  torch::Tensor& grad_b, const Chunking& ch) {
  const int64_t din = x.size(1), dout = b.size(2);
  float* gx = grad_x.defined() ? grad_x.data_ptr<float>() : nullptr;
  switch (a.size(1)) {
#define CASE(R)                                                                                                        \
  case R:                                                                                                              \
    backward_rank<R>(grad.data_ptr<float>(), x.data_ptr<float>(), a.data_ptr<float>(), b.data_ptr<float>(),            \
                     h.data_ptr<float>(), scaling, grad_h.data_ptr<float>(), gx, grad_a.data_ptr<float>(),             \
                     grad_b.data_ptr<float>(), din, dout, ch);                                                         \
    break;
    FLIX_RANKS(CASE)
#undef CASE
  }
}

}  // namespace

// (update, h): update = scaling * h b_e with h = x a_e^T, for each example e: n / g tokens
// each, or (packed rows) the tokens bounds[e] .. bounds[e + 1]
std::vector<torch::Tensor> lowrank_forward(torch::Tensor x, torch::Tensor a, torch::Tensor b, double scaling,
                                           c10::optional<torch::Tensor> bounds) {
  check_shapes(x, a, b, bounds);
  const int64_t n = x.size(0);
  auto h = torch::empty({n, a.size(1)}, x.options());
  auto update = torch::empty({n, b.size(2)}, x.options());
  if (bounds)
    forward_any(x, a, b, static_cast<float>(scaling), h, update, Segments(*bounds));
  else
    forward_any(x, a, b, static_cast<float>(scaling), h, update, Chunks(a.size(0), n));
  return {update, h};
}

// (grad_x less the frozen weight's part, or undefined without need_x; grad_a; grad_b)
std::vector<torch::Tensor> lowrank_backward(torch::Tensor grad, torch::Tensor x, torch::Tensor a, torch::Tensor b,
                                            torch::Tensor h, double scaling, bool need_x,
                                            c10::optional<torch::Tensor> bounds) {
  check_shapes(x, a, b, bounds);
  check(grad, "grad"); check(h, "h");
  TORCH_CHECK(grad.size(0) == x.size(0) && grad.size(1) == b.size(2) && h.size(0) == x.size(0) && h.size(1) == a.size(1),
              "flix cpu_kernels: grad (n, dout) and h (n, r)");
  const int64_t g = a.size(0), r = a.size(1), n = x.size(0), din = x.size(1), dout = b.size(2);
  auto grad_h = torch::empty({n, r}, x.options());
  auto grad_x = need_x ? torch::empty({n, din}, x.options()) : torch::Tensor();
  torch::Tensor grad_a, grad_b;  // per chunk, summed per example below
  if (bounds) {
    const Segments ch(*bounds);
    grad_a = torch::zeros({ch.count(), r, din}, x.options());
    grad_b = torch::zeros({ch.count(), r, dout}, x.options());
    backward_any(grad, x, a, b, h, static_cast<float>(scaling), grad_h, grad_x, grad_a, grad_b, ch);
    if (ch.count() != g) {
      auto owner = torch::tensor(ch.owner, torch::kLong);
      grad_a = torch::zeros({g, r, din}, x.options()).index_add_(0, owner, grad_a);
      grad_b = torch::zeros({g, r, dout}, x.options()).index_add_(0, owner, grad_b);
    }
  } else {
    const Chunks ch(g, n);
    grad_a = torch::zeros({ch.count(), r, din}, x.options());
    grad_b = torch::zeros({ch.count(), r, dout}, x.options());
    backward_any(grad, x, a, b, h, static_cast<float>(scaling), grad_h, grad_x, grad_a, grad_b, ch);
    if (ch.splits > 1) {
      grad_a = grad_a.view({g, ch.splits, r, din}).sum(1);
      grad_b = grad_b.view({g, ch.splits, r, dout}).sum(1);
    }
  }
  grad_b.mul_(scaling);
  return {grad_x, grad_a, grad_b};
}

// AdamW on rows[i] of p with the gradient values[i] and the moments at slots[i], in place:
// torch.optim.AdamW's arithmetic (decoupled decay, then moments, then the step), bias
// corrections folded into step_size and bias2_sqrt by the caller. rows must be unique.
void sparse_adamw_(torch::Tensor p, torch::Tensor exp_avg, torch::Tensor exp_avg_sq, torch::Tensor rows,
                   torch::Tensor slots, torch::Tensor values, double step_size, double bias2_sqrt, double eps,
                   double decay, double beta1, double beta2) {
  check(p, "p"); check(exp_avg, "exp_avg"); check(exp_avg_sq, "exp_avg_sq"); check(values, "values");
  const int64_t n = rows.numel(), d = p.size(1);
  TORCH_CHECK(rows.scalar_type() == torch::kLong && slots.scalar_type() == torch::kLong && rows.is_contiguous() &&
                  slots.is_contiguous() && slots.numel() == n && values.size(0) == n && values.size(1) == d &&
                  exp_avg.size(1) == d && exp_avg_sq.sizes() == exp_avg.sizes(),
              "flix cpu_kernels: sparse_adamw_ shapes");
  for (const double value : {step_size, bias2_sqrt, eps, decay, beta1, beta2})  // as torch's ops refuse them
    TORCH_CHECK(std::isfinite(static_cast<float>(value)), "flix cpu_kernels: sparse_adamw_: ", value,
                " cannot be converted to type float without overflow");
  const int64_t *row = rows.data_ptr<int64_t>(), *slot = slots.data_ptr<int64_t>();
  for (int64_t i = 0; i < n; ++i)
    TORCH_CHECK(row[i] >= 0 && row[i] < p.size(0) && slot[i] >= 0 && slot[i] < exp_avg.size(0),
                "flix cpu_kernels: sparse_adamw_ row or slot out of range");
  float *w0 = p.data_ptr<float>(), *m0 = exp_avg.data_ptr<float>(), *v0 = exp_avg_sq.data_ptr<float>();
  const float* g0 = values.data_ptr<float>();
  const float lr = static_cast<float>(step_size), b2s = static_cast<float>(bias2_sqrt), ep = static_cast<float>(eps),
              dec = static_cast<float>(decay), b1 = static_cast<float>(beta1), b2 = static_cast<float>(beta2);
  const float c1 = 1 - b1, c2 = 1 - b2;
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1)), [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      float *w = w0 + row[i] * d, *m = m0 + slot[i] * d, *v = v0 + slot[i] * d;
      const float* g = g0 + i * d;
      for (int64_t j = 0; j < d; ++j) {
        m[j] = m[j] * b1 + c1 * g[j];
        v[j] = v[j] * b2 + c2 * g[j] * g[j];
        w[j] = w[j] * dec - lr * (m[j] / (std::sqrt(v[j]) / b2s + ep));
      }
    }
  });
}

// RMSNorm of each row of x (n, d): y = (x * rstd) * (offset + w), rstd = 1 / sqrt(mean(x^2) + eps)
// (offset 1: Gemma's weights around zero; 0: Llama's). Returns y and rstd (n), which backward takes.
std::vector<torch::Tensor> rms_norm_forward(torch::Tensor x, torch::Tensor w, double eps, double offset) {
  check(x, "x"); check(w, "w");
  TORCH_CHECK(x.dim() == 2 && w.dim() == 1 && w.size(0) == x.size(1) && x.size(1) % WIDTHS == 0,
              "flix cpu_kernels: rms_norm x (n, d), w (d), d a multiple of 16");
  const int64_t n = x.size(0), d = x.size(1);
  auto y = torch::empty_like(x), rstd = torch::empty({n}, x.options());
  const float *x0 = x.data_ptr<float>(), *w0 = w.data_ptr<float>();
  float *y0 = y.data_ptr<float>(), *r0 = rstd.data_ptr<float>();
  const float e = static_cast<float>(eps), off = static_cast<float>(offset);
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / d), [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const float* xi = x0 + i * d;
      float* yi = y0 + i * d;
      vf acc = {};
      for (int64_t j = 0; j < d; j += W) { const vf v = load(xi + j); acc += v * v; }
      const float r = 1.0f / std::sqrt(hsum(acc) / d + e);
      r0[i] = r;
      for (int64_t j = 0; j < d; j += W) store(yi + j, (load(xi + j) * r) * (load(w0 + j) + off));
    }
  });
  return {y, rstd};
}

// The input gradient of rms_norm_forward with w frozen: with s = offset + w,
// dx = rstd * (g * s) - (rstd^3 / d) * sum(g * s * x) * x.
torch::Tensor rms_norm_backward(torch::Tensor grad, torch::Tensor x, torch::Tensor w, torch::Tensor rstd, double offset) {
  check(grad, "grad"); check(x, "x"); check(w, "w"); check(rstd, "rstd");
  TORCH_CHECK(x.dim() == 2 && grad.sizes() == x.sizes() && w.dim() == 1 && w.size(0) == x.size(1) &&
                  rstd.numel() == x.size(0) && x.size(1) % WIDTHS == 0,
              "flix cpu_kernels: rms_norm_backward shapes");
  const int64_t n = x.size(0), d = x.size(1);
  auto dx = torch::empty_like(x);
  const float *g0 = grad.data_ptr<float>(), *x0 = x.data_ptr<float>(), *w0 = w.data_ptr<float>(), *r0 = rstd.data_ptr<float>();
  float* d0 = dx.data_ptr<float>();
  const float off = static_cast<float>(offset);
  at::parallel_for(0, n, std::max<int64_t>(1, 16384 / d), [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const float *gi = g0 + i * d, *xi = x0 + i * d;
      float* di = d0 + i * d;
      vf acc = {};
      for (int64_t j = 0; j < d; j += W) acc += load(gi + j) * (load(w0 + j) + off) * load(xi + j);
      const float r = r0[i], c = r * r * r * hsum(acc) / d;
      for (int64_t j = 0; j < d; j += W) store(di + j, r * (load(gi + j) * (load(w0 + j) + off)) - c * load(xi + j));
    }
  });
  return dx;
}

// exp(x) for float32 lanes: x = n ln2 + r with |r| <= ln2 / 2, exp(r) by its Taylor series to
// r^7 / 7! (error under 6e-9 relative), times 2^n built in the exponent bits. x is clamped to
// where 2^n is a normal float (results beyond are 0 or huge, which is what callers need).
typedef int32_t vi __attribute__((vector_size(sizeof(vf))));
inline vf vexp(vf x) {
  const vf lo = vf{} - 87.0f, hi = vf{} + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const vf shifter = vf{} + 12582912.0f;  // 1.5 * 2^23: adding and subtracting it rounds to an integer
  const vf n = (x * 1.44269504088896341f + shifter) - shifter;
  const vf r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // ln 2 in two parts, exactly
  vf p = vf{} + (1.0f / 5040);
  for (float c : {1.0f / 720, 1.0f / 120, 1.0f / 24, 1.0f / 6, 0.5f, 1.0f, 1.0f}) p = p * r + c;
  const vi bits = (__builtin_convertvector(n, vi) + 127) << 23;
  vf scale;
  __builtin_memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

// act(g) = g * s with s = sigmoid(z): z = 2 sqrt(2/pi) (g + 0.044715 g^3) is the tanh GELU
// (0.5 g (1 + tanh(z / 2)) = g sigmoid(z)), z = g is SiLU. dz: dz/dg.
inline void gate_of(vf g, bool gelu, vf& s, vf& dz) {
  constexpr float k0 = 2 * 0.7978845608028654f, k1 = 0.044715f;
  const vf one = vf{} + 1.0f;
  const vf z = gelu ? k0 * (g + k1 * g * g * g) : g;
  dz = gelu ? k0 * (one + 3 * k1 * g * g) : one;
  s = one / (one + vexp(-z));
}

void check_gated(const torch::Tensor& gate, const torch::Tensor& up) {
  check(gate, "gate"); check(up, "up");
  TORCH_CHECK(gate.sizes() == up.sizes() && gate.numel() % W == 0, "flix cpu_kernels: gate and up of one shape, a multiple of the vector width");
}

// out = act(gate) * up, elementwise.
torch::Tensor gated_forward(torch::Tensor gate, torch::Tensor up, bool gelu) {
  check_gated(gate, up);
  auto out = torch::empty_like(gate);
  const float *g0 = gate.data_ptr<float>(), *u0 = up.data_ptr<float>();
  float* o0 = out.data_ptr<float>();
  at::parallel_for(0, gate.numel() / W, 2048, [&](int64_t first, int64_t last) {
    for (int64_t i = first * W; i < last * W; i += W) {
      vf s, dz;
      const vf g = load(g0 + i);
      gate_of(g, gelu, s, dz);
      store(o0 + i, g * s * load(u0 + i));
    }
  });
  return out;
}

// Gradients of gated_forward: d gate = grad * up * (s + g s (1 - s) dz), d up = grad * g s.
std::vector<torch::Tensor> gated_backward(torch::Tensor grad, torch::Tensor gate, torch::Tensor up, bool gelu) {
  check_gated(gate, up); check(grad, "grad");
  TORCH_CHECK(grad.sizes() == gate.sizes(), "flix cpu_kernels: gated_backward: grad of gate's shape");
  auto grad_gate = torch::empty_like(gate), grad_up = torch::empty_like(up);
  const float *d0 = grad.data_ptr<float>(), *g0 = gate.data_ptr<float>(), *u0 = up.data_ptr<float>();
  float *gg0 = grad_gate.data_ptr<float>(), *gu0 = grad_up.data_ptr<float>();
  at::parallel_for(0, gate.numel() / W, 2048, [&](int64_t first, int64_t last) {
    for (int64_t i = first * W; i < last * W; i += W) {
      vf s, dz;
      const vf g = load(g0 + i), d = load(d0 + i);
      gate_of(g, gelu, s, dz);
      store(gu0 + i, d * g * s);
      store(gg0 + i, d * load(u0 + i) * (s + g * s * (1.0f - s) * dz));
    }
  });
  return {grad_gate, grad_up};
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("lowrank_forward", &lowrank_forward, "update and h of the adapters' forward pass", py::arg("x"), py::arg("a"),
        py::arg("b"), py::arg("scaling"), py::arg("bounds") = py::none());
  m.def("lowrank_backward", &lowrank_backward, "grad_x (the adapters' part), grad_a, grad_b", py::arg("grad"), py::arg("x"),
        py::arg("a"), py::arg("b"), py::arg("h"), py::arg("scaling"), py::arg("need_x"), py::arg("bounds") = py::none());
  m.def("sparse_adamw_", &sparse_adamw_, "AdamW on a bank's touched rows, in place");
  m.def("rms_norm_forward", &rms_norm_forward, "RMSNorm rows and their rstd");
  m.def("rms_norm_backward", &rms_norm_backward, "RMSNorm's input gradient, weight frozen");
  m.def("gated_forward", &gated_forward, "act(gate) * up (tanh GELU or SiLU)");
  m.def("gated_backward", &gated_backward, "gradients of act(gate) * up");
}
