// Layer norm over rows in float32 (golden: npu/golden/layernorm.py).
//
//   layernorm_f32(x[m, n], gamma[n], beta[n], y[m, n], m, n)
//
// Two passes in lane order: mean = sum(x) / n, then var = sum(d * d) / n with d = x - mean;
// rstd = 1 / sqrt(var + 1e-5) with IEEE sqrt and division; y = (d * rstd) * gamma + beta.
#include "numerics.h"

namespace {

const float EPS = 0x1.4f8b58p-17f;  // float32(1e-5)

#if STREAMD_AIE2
using streamd::v16f;

void layernorm_row_vector(const float* x, const float* gamma, const float* beta, float* y, int32_t n) {
  const int32_t n16 = n / 16 * 16;
  const float count = (float)n;
  float sums[STREAMD_LANES];

  v16f lanes = aie::zeros<float, 16>();
  for (int32_t j = 0; j < n16; j += 16) STREAMD_PIPELINE {
      lanes = streamd::vlanes_add(lanes, aie::load_unaligned_v<16>(x + j));
    }
  streamd::vlanes_store(sums, lanes);
  for (int32_t j = n16; j < n; ++j) sums[j % STREAMD_LANES] = sums[j % STREAMD_LANES] + x[j];
  const float mean = streamd::lanes_tree(sums) / count;

  lanes = aie::zeros<float, 16>();
  for (int32_t j = 0; j < n16; j += 16) STREAMD_PIPELINE {
      const v16f d = aie::sub(aie::load_unaligned_v<16>(x + j), mean);
      lanes = streamd::vlanes_add(lanes, streamd::vmul(d, d));
    }
  streamd::vlanes_store(sums, lanes);
  for (int32_t j = n16; j < n; ++j) {
    const float d = x[j] - mean;
    sums[j % STREAMD_LANES] = sums[j % STREAMD_LANES] + d * d;
  }
  const float var = streamd::lanes_tree(sums) / count;
  const float rstd = 1.0f / sqrtf(var + EPS);  // scalar unit: IEEE sqrt and division, as the golden model

  for (int32_t j = 0; j < n16; j += 16) STREAMD_PIPELINE {
      const v16f d = aie::sub(aie::load_unaligned_v<16>(x + j), mean);
      v16f out = streamd::vmul(d, rstd);
      out = streamd::vmul(out, aie::load_unaligned_v<16>(gamma + j));
      out = aie::add(out, aie::load_unaligned_v<16>(beta + j));
      aie::store_unaligned_v(y + j, out);
    }
  for (int32_t j = n16; j < n; ++j) {
    float out = (x[j] - mean) * rstd;
    out = out * gamma[j];
    y[j] = out + beta[j];
  }
}
#endif

[[maybe_unused]] void layernorm_row_scalar(const float* x, const float* gamma, const float* beta, float* y, int32_t n) {
  const float count = (float)n;
  float sums[STREAMD_LANES];
  streamd::lanes_clear(sums);
  for (int32_t j = 0; j < n; ++j) sums[j % STREAMD_LANES] = sums[j % STREAMD_LANES] + x[j];
  const float mean = streamd::lanes_tree(sums) / count;
  streamd::lanes_clear(sums);
  for (int32_t j = 0; j < n; ++j) {
    const float d = x[j] - mean;
    sums[j % STREAMD_LANES] = sums[j % STREAMD_LANES] + d * d;
  }
  const float var = streamd::lanes_tree(sums) / count;
  const float rstd = 1.0f / sqrtf(var + EPS);
  for (int32_t j = 0; j < n; ++j) {
    float out = (x[j] - mean) * rstd;
    out = out * gamma[j];
    y[j] = out + beta[j];
  }
}

}  // namespace

extern "C" {

void layernorm_f32(const float* x, const float* gamma, const float* beta, float* y, int32_t m, int32_t n) {
  for (int32_t i = 0; i < m; ++i) {
    const int64_t row = (int64_t)i * n;
#if STREAMD_AIE2
    layernorm_row_vector(x + row, gamma, beta, y + row, n);
#else
    layernorm_row_scalar(x + row, gamma, beta, y + row, n);
#endif
  }
}

}  // extern "C"
