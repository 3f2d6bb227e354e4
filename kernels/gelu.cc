// Exact (erf) GELU from a table, optionally plus a residual (golden: npu/golden/gelu.py).
//
//   gelu_f32(x[count], residual[count] | NULL, y[count], count):  y = residual + gelu(x)
//
// For 2**-4 <= |x| < 8 the value is read at the bf16 grid point below x (x's top 16 bits:
// sign, exponent, 7 mantissa bits) and linearly interpolated with x's low 16 bits; below,
// x * (0.5 + x / sqrt(2 pi)); at and above 8 (and for inf/NaN), x for positive x and +0 for
// negative x.
#include "numerics.h"
#include "tables.h"

namespace {

const float INV_SQRT_2PI = 0x1.988454p-2f;  // float32(1 / sqrt(2 pi))
const float FRACTION = 0x1p-16f;            // the low 16 bits as a fraction of one grid step
const int32_t TABLE_ROW = GELU_BINADES * GELU_STEPS + 1;
const float* const TABLE = &GELU_TABLE[0][0];

inline float gelu_one(float x) {
  const uint32_t bits = streamd::float_bits(x);
  const int32_t negative = (int32_t)(bits >> 31);
  const int32_t exponent = (int32_t)((bits >> 23) & 0xFF) - 127;
  if (exponent < GELU_MIN_EXP) return x * (0.5f + x * INV_SQRT_2PI);
  if (exponent >= GELU_MIN_EXP + GELU_BINADES) return negative ? 0.0f : x;
  const int32_t index = (exponent - GELU_MIN_EXP) * GELU_STEPS + (int32_t)((bits >> 16) & 0x7F);
  const float low = (float)(bits & 0xFFFF) * FRACTION;
  const float here = TABLE[negative * TABLE_ROW + index];
  const float step = TABLE[negative * TABLE_ROW + index + 1] - here;
  return here + step * low;
}

#if STREAMD_AIE2
using streamd::v16f;
using streamd::v16i;

inline v16f gelu_16(const v16f& x) {
  const v16i bits = aie::vector_cast<int32_t>(x);
  const aie::mask<16> negative = aie::lt(bits, 0);
  const v16i exponent = aie::sub(aie::bit_and(0xFF, aie::downshift(bits, 23)), 127);
  const v16i mantissa7 = aie::bit_and(0x7F, aie::downshift(bits, 16));
  const v16f low = aie::to_float<float>(aie::bit_and(0xFFFF, bits), 16);  // (bits & 0xFFFF) * 2**-16, exact
  v16i index = aie::add(aie::upshift(aie::sub(exponent, GELU_MIN_EXP), 7), mantissa7);  // GELU_STEPS == 128
  index = aie::max(aie::min(index, GELU_BINADES * GELU_STEPS - 1), 0);
  index = aie::select(index, aie::add(index, TABLE_ROW), negative);
  const v16f here = streamd::vgather(TABLE, index);
  const v16f next = streamd::vgather(TABLE + 1, index);
  const v16f table = aie::add(here, streamd::vmul(aie::sub(next, here), low));
  const v16f series = streamd::vmul(x, aie::add(0.5f, streamd::vmul(x, INV_SQRT_2PI)));
  const v16f large = aie::select(x, 0.0f, negative);
  v16f y = aie::select(table, series, aie::lt(exponent, GELU_MIN_EXP));
  return aie::select(y, large, aie::ge(exponent, GELU_MIN_EXP + GELU_BINADES));
}
static_assert(GELU_STEPS == 128, "gelu_16 multiplies by GELU_STEPS with a shift by 7");
#endif

}  // namespace

extern "C" {

void gelu_f32(const float* x, const float* residual, float* y, int32_t count) {
  int32_t i = 0;
#if STREAMD_AIE2
  for (; i + 16 <= count; i += 16) STREAMD_PIPELINE {
      v16f out = gelu_16(aie::load_unaligned_v<16>(x + i));
      if (residual) out = aie::add(aie::load_unaligned_v<16>(residual + i), out);
      aie::store_unaligned_v(y + i, out);
    }
#endif
  for (; i < count; ++i) {
    const float g = gelu_one(x[i]);
    y[i] = residual ? residual[i] + g : g;
  }
}

}  // extern "C"
