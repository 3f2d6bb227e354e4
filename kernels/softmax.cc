// Row softmax in float32 with a table exponential (golden: npu/golden/softmax.py).
//
//   softmax_f32(x[m, n], y[m, n], m, n, n_valid[m] | NULL)
//
// Row i uses its first n_valid[i] entries (all n when n_valid is NULL); the rest of the row is
// 0 (causal masking). exp(d) for d = x - max <= 0 is 2**t, t = d * log2(e) = n + f: 2**f from
// EXP2_TABLE (256 entries) times 1 + r ln 2 for the remainder r < 1/256, scaled by 2**n
// exactly; t < -126 gives 0. The row sum is taken in lane order, then y = e * (1 / sum).
#include "numerics.h"
#include "tables.h"

namespace {

const float LOG2E = 0x1.715476p+0f;  // float32(log2(e))
const float LN2 = 0x1.62e43p-1f;     // float32(ln 2)
const float STEP = 0x1p-8f;          // 1 / 2**EXP2_BITS

// exp(d) for d <= 0, as npu.golden.softmax.exp_neg computes it.
inline float exp_neg(float d) {
  const float t = d * LOG2E;
  if (t < -126.0f) return 0.0f;
  if (t != t) return t;  // NaN in, NaN out (the golden model has no defined answer)
  const float nf = floorf(t);
  const float f = t - nf;
  const int32_t idx = (int32_t)(f * (float)(1 << EXP2_BITS));
  const float r = f - (float)idx * STEP;
  float poly = r * LN2;
  poly = poly + 1.0f;
  const float e = EXP2_TABLE[idx] * poly;
  return ldexpf(e, (int)nf);
}

inline int32_t valid_count(const int32_t* n_valid, int32_t i, int32_t n) {
  if (!n_valid) return n;
  const int32_t v = n_valid[i];
  return v < 0 ? 0 : (v > n ? n : v);
}

#if STREAMD_AIE2
using streamd::v16f;
using streamd::v16i;

// exp_neg on 16 lanes; `invalid` lanes are computed on d = 0 (as the golden model does) and
// their result is not used.
inline v16f vexp_neg(v16f d, aie::mask<16> invalid) {
  d = aie::select(d, 0.0f, invalid);
  v16f t = streamd::vmul(d, LOG2E);
  const aie::mask<16> low = aie::lt(t, -126.0f);
  t = aie::select(t, 0.0f, low);
  const v16i n = streamd::vfloor_i32(t);
  const v16f f = aie::sub(t, aie::to_float<float>(n, 0));
  v16i idx = streamd::vfloor_i32(streamd::vmul(f, (float)(1 << EXP2_BITS)));
  idx = aie::max(aie::min(idx, (1 << EXP2_BITS) - 1), 0);  // a no-op for valid lanes: keeps loads in bounds
  const v16f r = aie::sub(f, aie::to_float<float>(idx, EXP2_BITS));  // idx * 2**-8, exact
  const v16f poly = aie::add(streamd::vmul(r, LN2), 1.0f);
  const v16f e = streamd::vmul(streamd::vgather(EXP2_TABLE, idx), poly);
  // ldexp: e is in [1, 2] and n in [-126, 0], so adding n to the exponent field is exact.
  const v16i scaled = aie::add(aie::vector_cast<int32_t>(e), aie::upshift(n, 23));
  return aie::select(aie::vector_cast<float>(scaled), 0.0f, low);
}

void softmax_row_vector(const float* x, float* y, int32_t n, int32_t nv) {
  float top = -INFINITY;
  int32_t j = 0;
  if (nv >= 16) {
    v16f vmax = aie::broadcast<float, 16>(-INFINITY);
    for (; j + 16 <= nv; j += 16) vmax = aie::max(vmax, aie::load_unaligned_v<16>(x + j));
    top = aie::reduce_max(vmax);
  }
  for (; j < nv; ++j)
    if (x[j] > top) top = x[j];

  v16f lanes = aie::zeros<float, 16>();
  const int32_t n16 = n / 16 * 16;
  for (j = 0; j < n16; j += 16) STREAMD_PIPELINE {
      v16f e = aie::zeros<float, 16>();
      if (j < nv) {
        const uint32_t valid_lanes = nv - j >= 16 ? 0xFFFFu : ((1u << (nv - j)) - 1u);
        const aie::mask<16> invalid = aie::mask<16>::from_uint32(~valid_lanes & 0xFFFFu);
        e = vexp_neg(aie::sub(aie::load_unaligned_v<16>(x + j), top), invalid);
        e = aie::select(e, 0.0f, invalid);
      }
      aie::store_unaligned_v(y + j, e);
      lanes = streamd::vlanes_add(lanes, e);
    }
  float sums[STREAMD_LANES];
  streamd::vlanes_store(sums, lanes);
  for (j = n16; j < n; ++j) {
    const float e = j < nv ? exp_neg(x[j] - top) : 0.0f;
    y[j] = e;
    sums[j % STREAMD_LANES] = sums[j % STREAMD_LANES] + e;
  }
  const float inv = 1.0f / streamd::lanes_tree(sums);
  for (j = 0; j < n16; j += 16) aie::store_unaligned_v(y + j, streamd::vmul(aie::load_unaligned_v<16>(y + j), inv));
  for (j = n16; j < n; ++j) y[j] = y[j] * inv;
}
#endif

[[maybe_unused]] void softmax_row_scalar(const float* x, float* y, int32_t n, int32_t nv) {
  float top = -INFINITY;
  for (int32_t j = 0; j < nv; ++j)
    if (x[j] > top) top = x[j];
  float sums[STREAMD_LANES];
  streamd::lanes_clear(sums);
  for (int32_t j = 0; j < n; ++j) {
    const float e = j < nv ? exp_neg(x[j] - top) : 0.0f;
    y[j] = e;
    sums[j % STREAMD_LANES] = sums[j % STREAMD_LANES] + e;
  }
  const float inv = 1.0f / streamd::lanes_tree(sums);
  for (int32_t j = 0; j < n; ++j) y[j] = y[j] * inv;
}

}  // namespace

extern "C" {

void softmax_f32(const float* x, float* y, int32_t m, int32_t n, const int32_t* n_valid) {
  for (int32_t i = 0; i < m; ++i) {
    const int64_t row = (int64_t)i * n;
#if STREAMD_AIE2
    softmax_row_vector(x + row, y + row, n, valid_count(n_valid, i, n));
#else
    softmax_row_scalar(x + row, y + row, n, valid_count(n_valid, i, n));
#endif
  }
}

}  // extern "C"
