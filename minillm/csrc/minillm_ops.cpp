// C++ CPU operators of minillm: counter-based noise, the perturbed (+-eps) linear with fused
// input statistics, and the FMS score reduction. Built on first use by
// minillm/kernels/cpp.py through torch.utils.cpp_extension.load (ninja, OpenMP via ATen's
// parallel_for). Semantics: minillm/kernels/reference.py; noise: minillm/kernels/noise.py.
#include <torch/extension.h>

#include <ATen/Parallel.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr uint32_t kRowMul = 0x85EBCA77u;
constexpr uint32_t kWordMul = 0xC2B2AE3Du;
constexpr int64_t kChunkElems = 1 << 20;  // weights per chunk: 4 MiB of float32

inline uint32_t fmix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

inline uint32_t row_key(uint32_t key, int64_t row) {
  return fmix32(key ^ (static_cast<uint32_t>(row) * kRowMul));
}

inline uint32_t word(uint32_t rkey, int64_t w) {
  return fmix32(rkey ^ (static_cast<uint32_t>(w) * kWordMul));
}

inline float box_muller(uint32_t h1, uint32_t h2) {
  const float u1 = static_cast<float>((h1 >> 8) + 1u) * 5.9604644775390625e-08f;  // 2^-24
  const float u2 = static_cast<float>(h2 >> 8) * 5.9604644775390625e-08f;
  return std::sqrt(-2.0f * std::log(u1)) * std::cos(6.283185307179586f * u2);
}

// +1.0f if bit b of h is set, else -1.0f, without a branch (random bits defeat prediction):
// the float is 1.0f with its sign bit set from the inverted bit.
inline float sign_of_bit(uint32_t h, int64_t b) {
  const uint32_t bits = 0x3F800000u | ((((~h) >> b) & 1u) << 31);
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Noise of one row, columns [c0, c0 + n), written to out[0:n].
void noise_row(uint32_t key, int64_t row, int64_t c0, int64_t n, bool gaussian, float* out) {
  const uint32_t rk = row_key(key, row);
  if (gaussian) {
    for (int64_t j = 0; j < n; ++j) {
      const int64_t c = c0 + j;
      out[j] = box_muller(word(rk, 2 * c), word(rk, 2 * c + 1));
    }
    return;
  }
  int64_t j = 0;
  while (j < n) {
    const int64_t c = c0 + j;
    const uint32_t h = word(rk, c >> 5);
    const int64_t b0 = c & 31;
    if (b0 == 0 && n - j >= 32) {
      for (int b = 0; b < 32; ++b) out[j + b] = sign_of_bit(h, b);
      j += 32;
      continue;
    }
    const int64_t len = std::min<int64_t>(32 - b0, n - j);
    for (int64_t b = 0; b < len; ++b) out[j + b] = sign_of_bit(h, b0 + b);
    j += len;
  }
}

torch::Tensor noise(int64_t key, int64_t rows, int64_t cols, int64_t row_start, int64_t col_start,
                    bool gaussian) {
  auto out = torch::empty({rows, cols}, torch::kFloat32);
  float* p = out.data_ptr<float>();
  const auto k = static_cast<uint32_t>(key);
  at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) noise_row(k, row_start + r, col_start, cols, gaussian, p + r * cols);
  });
  return out;
}

// Per-column sum of squares and sum of x [M, K] in float32, parallel over column blocks.
std::tuple<torch::Tensor, torch::Tensor> column_stats(const torch::Tensor& x) {
  const int64_t m = x.size(0), k = x.size(1);
  auto sum_sq = torch::zeros({k}, torch::kFloat32);
  auto sum = torch::zeros({k}, torch::kFloat32);
  float* q = sum_sq.data_ptr<float>();
  float* s = sum.data_ptr<float>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "column_stats", [&] {
    const scalar_t* px = x.data_ptr<scalar_t>();
    at::parallel_for(0, k, 256, [&](int64_t k0, int64_t k1) {
      for (int64_t i = 0; i < m; ++i) {
        const scalar_t* row = px + i * k;
        for (int64_t j = k0; j < k1; ++j) {  // vectorizable along the contiguous columns
          const float v = static_cast<float>(row[j]);
          q[j] += v * v;
          s[j] += v;
        }
      }
    });
  });
  return {sum_sq, sum};
}

// kind: 0 dense, 1 rows, 2 cols. x [M, K] contiguous, w [N, K] contiguous.
// Dense: for each chunk of output rows, builds W_c + eps Z_c and W_c - eps Z_c (transient:
// 2 x kChunkElems elements in w's dtype, 2 x 4 MiB in float32) and runs two BLAS products on
// the two halves of x, so the pair costs the FLOPs of one plain forward plus O(N K) noise work
// per call (x W^T +- eps x Z^T would cost the FLOPs of two).
std::vector<torch::Tensor> perturbed_linear(torch::Tensor x, torch::Tensor w,
                                            c10::optional<torch::Tensor> bias, int64_t key,
                                            double eps, bool gaussian, int64_t kind, bool stats) {
  TORCH_CHECK(x.device().is_cpu() && w.device().is_cpu(), "minillm C++ ops take CPU tensors");
  x = x.contiguous();
  w = w.contiguous().to(x.scalar_type());
  const int64_t m = x.size(0), k = x.size(1), n = w.size(0), h = m / 2;
  std::vector<torch::Tensor> out(3);
  if (stats) {
    auto st = column_stats(x);
    out[1] = std::get<0>(st);
    out[2] = std::get<1>(st);
  } else {
    out[1] = torch::empty({0});
    out[2] = torch::empty({0});
  }
  const auto uk = static_cast<uint32_t>(key);
  const auto feps = static_cast<float>(eps);
  torch::Tensor y;
  if (eps == 0.0) {
    y = torch::mm(x, w.t());
  } else if (kind == 1 || kind == 2) {
    const int64_t units = kind == 1 ? n : k;
    auto z = torch::empty({units}, torch::kFloat32);
    float* pz = z.data_ptr<float>();
    for (int64_t u = 0; u < units; ++u) noise_row(uk, u, 0, 1, gaussian, pz + u);
    auto scale = torch::empty({2, units}, torch::kFloat32);  // row 0: 1 + eps z, row 1: 1 - eps z
    scale[0] = 1.0 + eps * z;
    scale[1] = 1.0 - eps * z;
    if (kind == 1) {
      y = torch::mm(x, w.t());
      y.narrow(0, 0, h).mul_(scale[0].to(y.scalar_type()));
      y.narrow(0, h, m - h).mul_(scale[1].to(y.scalar_type()));
    } else {
      auto xs = torch::empty_like(x);  // transient [M, K]
      xs.narrow(0, 0, h).copy_(x.narrow(0, 0, h).to(torch::kFloat32) * scale[0]);
      xs.narrow(0, h, m - h).copy_(x.narrow(0, h, m - h).to(torch::kFloat32) * scale[1]);
      y = torch::mm(xs, w.t());
    }
  } else {
    y = torch::empty({m, n}, x.options());
    const int64_t step = std::max<int64_t>(1, kChunkElems / std::max<int64_t>(k, 1));
    auto wp = torch::empty({std::min(step, n), k}, w.options());
    auto wm = torch::empty_like(wp);
    auto xp = x.narrow(0, 0, h), xm = x.narrow(0, h, m - h);
    for (int64_t r0 = 0; r0 < n; r0 += step) {
      const int64_t nr = std::min(step, n - r0);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, w.scalar_type(), "perturb", [&] {
        const scalar_t* pw = w.data_ptr<scalar_t>() + r0 * k;
        scalar_t* pp = wp.data_ptr<scalar_t>();
        scalar_t* pm = wm.data_ptr<scalar_t>();
        at::parallel_for(0, nr, 4, [&](int64_t a, int64_t b) {
          std::vector<float> z(k);
          for (int64_t r = a; r < b; ++r) {
            noise_row(uk, r0 + r, 0, k, gaussian, z.data());
            for (int64_t j = 0; j < k; ++j) {  // vectorizable
              const float v = static_cast<float>(pw[r * k + j]);
              pp[r * k + j] = static_cast<scalar_t>(v + feps * z[j]);
              pm[r * k + j] = static_cast<scalar_t>(v - feps * z[j]);
            }
          }
        });
      });
      // written in place: a column block of y is a valid BLAS output (leading dimension N)
      auto yp = y.narrow(0, 0, h).narrow(1, r0, nr);
      auto ym = y.narrow(0, h, m - h).narrow(1, r0, nr);
      torch::mm_out(yp, xp, wp.narrow(0, 0, nr).t());
      torch::mm_out(ym, xm, wm.narrow(0, 0, nr).t());
    }
  }
  if (bias.has_value() && bias->defined()) y.add_(bias->to(y.scalar_type()));
  out[0] = y;
  return out;
}

// Row and column sums of |W_ij| * xn_j * |sum_s c_s Z_s,ij|, parallel over rows; G exists one
// row at a time per thread.
std::vector<torch::Tensor> fms_scores(torch::Tensor w, torch::Tensor xn, std::vector<int64_t> keys,
                                      std::vector<double> coeffs, bool gaussian) {
  w = w.contiguous().to(torch::kFloat32);
  xn = xn.contiguous().to(torch::kFloat32);
  const int64_t n = w.size(0), k = w.size(1);
  auto rows = torch::zeros({n}, torch::kFloat32);
  const int nthreads = at::get_num_threads();
  auto colp = torch::zeros({nthreads, k}, torch::kFloat32);
  const float* pw = w.data_ptr<float>();
  const float* px = xn.data_ptr<float>();
  float* pr = rows.data_ptr<float>();
  float* pc = colp.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t a, int64_t b) {
    std::vector<float> g(k), z(k);
    float* col = pc + at::get_thread_num() * k;
    for (int64_t r = a; r < b; ++r) {
      std::fill(g.begin(), g.end(), 0.0f);
      for (size_t s = 0; s < keys.size(); ++s) {
        noise_row(static_cast<uint32_t>(keys[s]), r, 0, k, gaussian, z.data());
        const auto c = static_cast<float>(coeffs[s]);
        for (int64_t j = 0; j < k; ++j) g[j] += c * z[j];
      }
      float acc = 0.0f;
      for (int64_t j = 0; j < k; ++j) {
        const float v = std::fabs(pw[r * k + j]) * px[j] * std::fabs(g[j]);
        acc += v;
        col[j] += v;
      }
      pr[r] = acc;
    }
  });
  return {rows, colp.sum(0)};
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("noise", &noise, "counter-based noise [rows, cols] float32");
  m.def("perturbed_linear", &perturbed_linear, "+-eps perturbed linear with input statistics");
  m.def("fms_scores", &fms_scores, "FMS row/column score sums from SPSA seeds and coefficients");
}
