// Fused CPU forward and backward passes of normlab's norm types (LayerNorm: ATen's kernel), RoPE
// and SwiGLU's gate (built by normlab/nn/fused.py).
//
// Every function takes contiguous fp32 rows x of shape (N, D) and works on one row at a time
// (a row stays in cache between its reduction and its elementwise pass), rows split across
// torch's intra-op threads. Gradients of per-channel parameters are summed per thread, then
// across threads. Notation as in norms.py: ms(x) = mean_i x_i^2, r = 1 / sqrt(stat + eps).
//
// ATen and torch's pybind11 casters, not <torch/extension.h>: the build takes 40% less CPU time.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>

namespace {

// tanh from plain arithmetic without branches, so that the loops vectorize (with
// -fno-trapping-math): tanh(x) = sign(x) E / (E + 2) with E = expm1(2|x|), |x| clamped to 9 (where
// tanh rounds to 1 in fp32). expm1(y) = 2^n expm1(r) + (2^n - 1) with y = n ln2 + r, |r| <= ln2/2,
// and expm1(r) = r + r^2 P(r) with Cephes' exp polynomial P: no cancellation anywhere, so the
// error is a few ulp relative to tanh, also near 0, and one path serves every x (about 24
// operations, against 32 for a polynomial near 0 and exp beyond, both evaluated).
inline float fast_tanh(float x) {
  const float y = 2.f * std::min(std::fabs(x), 9.f);  // NaN stays NaN
  const float n = std::floor(y * 1.44269504088896341f + 0.5f);
  const float r = y - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const int32_t exponent_bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_n;
  std::memcpy(&two_n, &exponent_bits, sizeof two_n);
  const float e = two_n * (p * r * r + r) + (two_n - 1.f);
  return std::copysign(e / (e + 2.f), x);
}

// Gives each thread a range of rows: kernel(begin, end). The kernels take their pointers by
// value (not captured by reference), which is what lets gcc vectorize their loops.
template <typename Kernel>
void parallel_rows(int64_t N, const Kernel& kernel) {
  at::parallel_for(0, N, 1, kernel);
}

// The same with per-channel sums: kernel(begin, end, partial) adds into this thread's zeroed
// (n_partials, D) buffer; returns the partials summed over threads, shape (n_partials, D).
template <typename Kernel>
at::Tensor parallel_rows_with_sums(int64_t N, int64_t D, int64_t n_partials, const Kernel& kernel) {
  auto partials = at::zeros({at::get_num_threads(), n_partials, D}, at::kFloat);
  float* base = partials.data_ptr<float>();
  at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
    kernel(begin, end, base + at::get_thread_num() * n_partials * D);
  });
  return partials.sum(0);
}

const float* in(const at::Tensor& t) { return t.data_ptr<float>(); }
float* out(at::Tensor& t) { return t.data_ptr<float>(); }

// ---------------------------------------------------------------- RMSNorm: y = g * x * r, r = 1/sqrt(ms(x) + eps)

void rms_norm_forward_rows(const float* x, const float* g, float eps, float* y, float* r, int64_t begin,
                           int64_t end, int64_t D) {
  for (int64_t n = begin; n < end; ++n) {
    const float* xr = x + n * D;
    float* yr = y + n * D;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
    const float rn = 1.f / std::sqrt(ss / D + eps);
    r[n] = rn;
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) yr[i] = g[i] * (xr[i] * rn);
  }
}

std::tuple<at::Tensor, at::Tensor> rms_norm_forward(at::Tensor x, at::Tensor g, double eps) {
  const int64_t N = x.size(0), D = x.size(1);
  auto y = at::empty_like(x);
  auto r = at::empty({N}, x.options());
  parallel_rows(N, [&](int64_t begin, int64_t end) {
    rms_norm_forward_rows(in(x), in(g), eps, out(y), out(r), begin, end, D);
  });
  return {y, r};
}

// dx = r * (g dy) - x * r^3 * mean(g dy x);  dg = sum_rows dy * x * r
void rms_norm_backward_rows(const float* dy, const float* x, const float* g, const float* r, float* dx, float* dg,
                            int64_t begin, int64_t end, int64_t D) {
  for (int64_t n = begin; n < end; ++n) {
    const float *xr = x + n * D, *dyr = dy + n * D;
    float* dxr = dx + n * D;
    const float rn = r[n];
    float dot = 0.f;
#pragma omp simd reduction(+ : dot)
    for (int64_t i = 0; i < D; ++i) {
      dot += g[i] * dyr[i] * xr[i];
      dg[i] += dyr[i] * xr[i] * rn;
    }
    const float c = rn * rn * rn * dot / D;
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) dxr[i] = rn * g[i] * dyr[i] - c * xr[i];
  }
}

std::tuple<at::Tensor, at::Tensor> rms_norm_backward(at::Tensor dy, at::Tensor x, at::Tensor g,
                                                           at::Tensor r) {
  const int64_t N = x.size(0), D = x.size(1);
  auto dx = at::empty_like(x);
  auto dg = parallel_rows_with_sums(N, D, 1, [&](int64_t begin, int64_t end, float* sums) {
    rms_norm_backward_rows(in(dy), in(x), in(g), in(r), out(dx), sums, begin, end, D);
  });
  return {dx, dg[0]};
}

// ---------------------------------------------------------------- DyT: y = g * tanh(alpha x)

void dyt_forward_rows(const float* x, float alpha, const float* g, float* y, int64_t begin, int64_t end, int64_t D) {
  for (int64_t n = begin; n < end; ++n) {
    const float* xr = x + n * D;
    float* yr = y + n * D;
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) yr[i] = g[i] * fast_tanh(alpha * xr[i]);
  }
}

at::Tensor dyt_forward(at::Tensor x, at::Tensor alpha, at::Tensor g) {
  const int64_t N = x.size(0), D = x.size(1);
  auto y = at::empty_like(x);
  const float a = alpha.item<float>();
  parallel_rows(N, [&](int64_t begin, int64_t end) { dyt_forward_rows(in(x), a, in(g), out(y), begin, end, D); });
  return y;
}

// One row of the backward of y = g tanh(k x): t = tanh(k x), h = g dy (1 - t^2); writes dx = k h,
// adds dy t to dg and returns sum h x (what the gradients of k and, for BHyT, s2 are made of).
inline float tanh_norm_backward_row(const float* xr, const float* dyr, const float* g, float k, float* dg,
                                    float* dxr, int64_t D) {
  float shx = 0.f;
#pragma omp simd reduction(+ : shx)
  for (int64_t i = 0; i < D; ++i) {
    const float t = fast_tanh(k * xr[i]);
    const float h = g[i] * dyr[i] * (1.f - t * t);
    dg[i] += dyr[i] * t;
    shx += h * xr[i];
    dxr[i] = k * h;
  }
  return shx;
}

// t = tanh(alpha x), h = g dy (1 - t^2):  dx = alpha h;  dalpha = sum h x;  dg = sum dy t
// sums: row 0 dg, row 1 channel 0 dalpha.
void dyt_backward_rows(const float* dy, const float* x, float alpha, const float* g, float* dx, float* sums,
                       int64_t begin, int64_t end, int64_t D) {
  float* dg = sums;
  for (int64_t n = begin; n < end; ++n) {
    sums[D] += tanh_norm_backward_row(x + n * D, dy + n * D, g, alpha, dg, dx + n * D, D);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> dyt_backward(at::Tensor dy, at::Tensor x,
                                                                     at::Tensor alpha, at::Tensor g) {
  const int64_t N = x.size(0), D = x.size(1);
  auto dx = at::empty_like(x);
  const float a = alpha.item<float>();
  auto sums = parallel_rows_with_sums(N, D, 2, [&](int64_t begin, int64_t end, float* sums) {
    dyt_backward_rows(in(dy), in(x), a, in(g), out(dx), sums, begin, end, D);
  });
  return {dx, sums[1].narrow(0, 0, 1).clone(), sums[0]};
}

// ---------------------------------------------------------------- BHyT: y = g * tanh(lam x r / kappa), r = 1/sqrt(s2 + eps)

void mean_square_rows(const float* x, float* s2, int64_t begin, int64_t end, int64_t D) {
  for (int64_t n = begin; n < end; ++n) {
    const float* xr = x + n * D;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
    s2[n] = ss / D;
  }
}

// s2 = ms(x) per row, shape (N)
at::Tensor mean_square_forward(at::Tensor x) {
  const int64_t N = x.size(0), D = x.size(1);
  auto s2 = at::empty({N}, x.options());
  parallel_rows(N, [&](int64_t begin, int64_t end) { mean_square_rows(in(x), out(s2), begin, end, D); });
  return s2;
}

void mean_square_backward_rows(const float* ds2, const float* x, float* dx, int64_t begin, int64_t end, int64_t D) {
  for (int64_t n = begin; n < end; ++n) {
    const float* xr = x + n * D;
    float* dxr = dx + n * D;
    const float c = 2.f * ds2[n] / D;
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) dxr[i] = c * xr[i];
  }
}

// dx = ds2 * 2 x / D
at::Tensor mean_square_backward(at::Tensor ds2, at::Tensor x) {
  const int64_t N = x.size(0), D = x.size(1);
  auto dx = at::empty_like(x);
  parallel_rows(N, [&](int64_t begin, int64_t end) {
    mean_square_backward_rows(in(ds2), in(x), out(dx), begin, end, D);
  });
  return dx;
}

// lk = lam / kappa; s2 read, or computed and written when exact (BHyT*)
void bhyt_forward_rows(const float* x, float* s2, bool exact, float lk, const float* g, float eps, float* y,
                       int64_t begin, int64_t end, int64_t D) {
  for (int64_t n = begin; n < end; ++n) {
    const float* xr = x + n * D;
    float* yr = y + n * D;
    if (exact) {
      float ss = 0.f;
#pragma omp simd reduction(+ : ss)
      for (int64_t i = 0; i < D; ++i) ss += xr[i] * xr[i];
      s2[n] = ss / D;
    }
    const float k = lk / std::sqrt(s2[n] + eps);
#pragma omp simd
    for (int64_t i = 0; i < D; ++i) yr[i] = g[i] * fast_tanh(k * xr[i]);
  }
}

// s2 given (shape (N)), or ms(x) computed here when s2 is empty (BHyT*). Returns (y, s2).
std::tuple<at::Tensor, at::Tensor> bhyt_forward(at::Tensor x, at::Tensor s2, at::Tensor lam,
                                                      at::Tensor g, double kappa, double eps) {
  const int64_t N = x.size(0), D = x.size(1);
  const bool exact = s2.numel() == 0;
  auto stat = exact ? at::empty({N}, x.options()) : s2;
  auto y = at::empty_like(x);
  const float lk = lam.item<float>() / (float)kappa;
  parallel_rows(N, [&](int64_t begin, int64_t end) {
    bhyt_forward_rows(in(x), out(stat), exact, lk, in(g), eps, out(y), begin, end, D);
  });
  return {y, stat};
}

// k = lam r / kappa, t = tanh(k x), h = g dy (1 - t^2), S = sum h x:
// dx = k h (+ ds2 * 2 x / D when exact);  ds2 = -S lam r^3 / (2 kappa);  dlam = sum_rows S r / kappa;  dg = sum dy t.
// sums: row 0 dg, row 1 channel 0 dlam.
void bhyt_backward_rows(const float* dy, const float* x, const float* s2, float lk, const float* g, float kappa,
                        float eps, bool exact, const float* ds2_out, float* dx, float* ds2, float* sums,
                        int64_t begin, int64_t end, int64_t D) {
  float* dg = sums;
  for (int64_t n = begin; n < end; ++n) {
    const float *xr = x + n * D;
    float* dxr = dx + n * D;
    const float rn = 1.f / std::sqrt(s2[n] + eps), k = lk * rn;
    const float shx = tanh_norm_backward_row(xr, dy + n * D, g, k, dg, dxr, D);
    sums[D] += shx * rn / kappa;
    const float d_s2 = -0.5f * shx * lk * rn * rn * rn;
    if (exact) {  // the gradient reaching s2 through the norm, plus any from s2 as an output
      const float c = 2.f * (d_s2 + (ds2_out ? ds2_out[n] : 0.f)) / D;
#pragma omp simd
      for (int64_t i = 0; i < D; ++i) dxr[i] += c * xr[i];
    } else {
      ds2[n] = d_s2;
    }
  }
}

// Returns (dx, ds2 (shape (N); empty when exact), dlam, dg). When exact, ds2_out (shape (N), or
// empty) is the gradient of the s2 that bhyt_forward returned, used downstream (BHyT's shared
// statistic): it joins dx in the same pass.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> bhyt_backward(
    at::Tensor dy, at::Tensor x, at::Tensor s2, at::Tensor lam, at::Tensor g, double kappa,
    double eps, bool exact, at::Tensor ds2_out) {
  const int64_t N = x.size(0), D = x.size(1);
  auto dx = at::empty_like(x);
  auto ds2 = at::empty({exact ? 0 : N}, x.options());
  const float lk = lam.item<float>() / (float)kappa;
  auto sums = parallel_rows_with_sums(N, D, 2, [&](int64_t begin, int64_t end, float* sums) {
    bhyt_backward_rows(in(dy), in(x), in(s2), lk, in(g), kappa, eps, exact,
                       ds2_out.numel() ? in(ds2_out) : nullptr, out(dx), out(ds2), sums, begin, end, D);
  });
  return {dx, ds2, sums[1].narrow(0, 0, 1).clone(), sums[0]};
}

// ---------------------------------------------------------------- RoPE and SwiGLU (the block's other elementwise work)

// RoPE in the half-rotation layout, y_i = x_i c_i + x_{i+h} s_i and y_{i+h} = x_{i+h} c_{i+h} + x_i s_{i+h}
// (h = D/2, s the signed sin table), on x of shape (B, H, T, D) with any strides but a unit last
// one; c and s are (T, D). The map is linear and pairs i with i+h, so its transpose (the backward
// pass) is the same loop with the partners' sin entries: dx_i = dy_i c_i + dy_{i+h} s_{i+h}.
at::Tensor rope(at::Tensor x, at::Tensor c, at::Tensor s, bool transpose) {
  const int64_t H = x.size(1), T = x.size(2), D = x.size(3), h = D / 2;
  auto y = at::empty_like(x);
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2);
  const int64_t ys0 = y.stride(0), ys1 = y.stride(1), ys2 = y.stride(2);
  const float *xp = in(x), *cp = in(c), *sp = in(s);
  float* yp = out(y);
  auto row = [=](const float* xr, float* yr, int64_t t) {
    const float *cr = cp + t * D, *sr = sp + t * D;
    const float *s_lo = transpose ? sr + h : sr, *s_hi = transpose ? sr : sr + h;
#pragma omp simd
    for (int64_t i = 0; i < h; ++i) {
      const float lo = xr[i], hi = xr[i + h];
      yr[i] = lo * cr[i] + hi * s_lo[i];
      yr[i + h] = hi * cr[i + h] + lo * s_hi[i];
    }
  };
  // Rows are short (D = 16 in the thin models), so index arithmetic per row would cost as much as
  // the row: each task walks one index pair's rows by pointer steps, the inner loop over the
  // dimension with the smaller stride (heads, when x is q/k straight from the projection).
  const bool heads_inner = xs1 < xs2;
  const int64_t inner = heads_inner ? H : T, outer = heads_inner ? T : H;
  const int64_t x_in = heads_inner ? xs1 : xs2, x_out = heads_inner ? xs2 : xs1;
  const int64_t y_in = heads_inner ? ys1 : ys2, y_out = heads_inner ? ys2 : ys1;
  at::parallel_for(0, x.size(0) * outer, 1, [=](int64_t begin, int64_t end) {
    for (int64_t n = begin; n < end; ++n) {
      const int64_t b = n / outer, o = n % outer;
      const float* xr = xp + b * xs0 + o * x_out;
      float* yr = yp + b * ys0 + o * y_out;
      for (int64_t j = 0; j < inner; ++j, xr += x_in, yr += y_in) row(xr, yr, heads_inner ? o : j);
    }
  });
  return y;
}

// SwiGLU's gate, y = silu(g) u with silu(g) = g sigmoid(g) and sigmoid(g) = (1 + tanh(g/2)) / 2,
// on contiguous g and u of the same shape.
at::Tensor swiglu_forward(at::Tensor g, at::Tensor u) {
  auto y = at::empty_like(g);
  const float *gp = in(g), *up = in(u);
  float* yp = out(y);
  at::parallel_for(0, g.numel(), 4096, [=](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float sig = 0.5f + 0.5f * fast_tanh(0.5f * gp[i]);
      yp[i] = gp[i] * sig * up[i];
    }
  });
  return y;
}

// du = dy silu(g);  dg = dy u sigmoid(g) (1 + g (1 - sigmoid(g)))
std::tuple<at::Tensor, at::Tensor> swiglu_backward(at::Tensor dy, at::Tensor g, at::Tensor u) {
  auto dg = at::empty_like(g);
  auto du = at::empty_like(u);
  const float *dyp = in(dy), *gp = in(g), *up = in(u);
  float *dgp = out(dg), *dup = out(du);
  at::parallel_for(0, g.numel(), 4096, [=](int64_t begin, int64_t end) {
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      const float sig = 0.5f + 0.5f * fast_tanh(0.5f * gp[i]);
      dup[i] = dyp[i] * gp[i] * sig;
      dgp[i] = dyp[i] * up[i] * sig * (1.f + gp[i] * (1.f - sig));
    }
  });
  return {dg, du};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("rms_norm_forward", &rms_norm_forward);
  m.def("rms_norm_backward", &rms_norm_backward);
  m.def("dyt_forward", &dyt_forward);
  m.def("dyt_backward", &dyt_backward);
  m.def("mean_square_forward", &mean_square_forward);
  m.def("mean_square_backward", &mean_square_backward);
  m.def("bhyt_forward", &bhyt_forward);
  m.def("bhyt_backward", &bhyt_backward);
  m.def("rope", &rope);
  m.def("swiglu_forward", &swiglu_forward);
  m.def("swiglu_backward", &swiglu_backward);
}
