// Quantise, dequantise, requantise (golden: npu/golden/requant.py).
//
//   requant_i32_i8(acc[m, n], mult[n], shift[n], out[m, n], m, n):
//       out = saturate_i8(srs(int64(acc) * mult[j], shift[j]))   (round half to even, shift 1..59)
//   quantize_rows_f32_i8(x[m, n], q[m, n], scale[m], m, n):
//       scale = absmax / 127, q = saturate_i8(rint(x * (127 / absmax))); a zero row: scale 0, q 0
//   quantize_rows_f32_i16(x[m, n], q[m, n], scale[m], m, n):
//       the same to int16 with 32767 for 127 (the vocabulary projection's activations)
//   dequant_i32_f32(acc[m, n], row_scale[m], col_scale[n], bias[n] | NULL, residual[m, n] | NULL, out, m, n):
//       out = residual + ((float(acc) * row_scale[i]) * col_scale[j] + bias[j]), in that order
#include "numerics.h"

namespace {

inline int8_t requant_one(int32_t acc, int32_t mult, int shift) {
  return streamd::saturate_i8(streamd::shift_round_even((int64_t)acc * (int64_t)mult, shift));
}

// The range of each per-row quantisation target; hi (127 or 32767) is its `top`.
template <typename T>
struct QuantRange;
template <>
struct QuantRange<int8_t> {
  static constexpr int32_t lo = -128, hi = 127;
};
template <>
struct QuantRange<int16_t> {
  static constexpr int32_t lo = -32768, hi = 32767;
};

template <typename T>
inline T quantize_one(float x, float inv) {
  constexpr int32_t lo = QuantRange<T>::lo, hi = QuantRange<T>::hi;
  const float r = rintf(x * inv);  // ties to even in the default rounding mode
  return (T)(r < (float)lo ? lo : (r > (float)hi ? hi : (int32_t)r));  // both bounds are exact floats
}

inline float dequant_one(int32_t acc, float row_scale, float col_scale, const float* bias, const float* residual,
                         int32_t j, int64_t at) {
  float y = (float)acc;
  y = y * row_scale;
  y = y * col_scale;
  if (bias) y = y + bias[j];
  if (residual) y = residual[at] + y;
  return y;
}

#if STREAMD_AIE2
using v16i8 = aie::vector<int8_t, 16>;

// 16 columns of one row: the int32 x int32 products are exact in the 64-bit accumulator
// (emulated by aie_api with two 32x16 multiplies); srs takes one shift per instruction, so
// the lanes are converted once per distinct shift among them (usually one or two). Every
// shift of the contract (1..59) is one AIE2 srs; others are clamped as on the scalar path.
inline void requant_16(const int32_t* acc, const int32_t* mult, const int8_t* shift, int8_t* out) {
  const aie::accum<acc64, 16> prod = aie::mul<acc64>(aie::load_unaligned_v<16>(acc), aie::load_unaligned_v<16>(mult));
  int s16[16];
  for (int l = 0; l < 16; ++l) s16[l] = streamd::clamp_shift(shift[l]);
  v16i8 result = aie::zeros<int8_t, 16>();
  uint32_t todo = 0xFFFFu;
  while (todo) {
    int first = 0;
    while (!(todo & (1u << first))) ++first;
    const int s = s16[first];
    uint32_t lanes = 0;
    for (int l = first; l < 16; ++l)
      if (s16[l] == s) lanes |= 1u << l;
    result = aie::select(result, prod.template to_vector<int8_t>(s), aie::mask<16>::from_uint32(lanes));
    todo &= ~lanes;
  }
  aie::store_unaligned_v(out, result);
}

// int32 -> int8 or int16 with saturation (srs by 0), after the values were rounded.
template <typename T>
inline aie::vector<T, 16> narrow(const streamd::v16i& v) {
  aie::accum<acc32, 16> a;
  a.from_vector(v, 0);
  return a.template to_vector<T>(0);
}
#endif

// Symmetric per-row quantisation to T (int8 or int16): scale = absmax / top,
// q = saturate(rint(x * (top / absmax))), top = 127 or 32767; a zero row has scale 0 and q 0.
template <typename T>
void quantize_rows(const float* x, T* q, float* scale, int32_t m, int32_t n) {
  const float top = (float)QuantRange<T>::hi;
#if STREAMD_AIE2
  streamd::SrsModes modes;
  const int32_t n16 = n / 16 * 16;
#else
  const int32_t n16 = 0;
#endif
  for (int32_t i = 0; i < m; ++i) {
    const float* xr = x + (int64_t)i * n;
    T* qr = q + (int64_t)i * n;
    float absmax = 0.0f;
#if STREAMD_AIE2
    if (n16) {
      streamd::v16f vmax = aie::zeros<float, 16>();
      for (int32_t j = 0; j < n16; j += 16) vmax = aie::max(vmax, aie::abs(aie::load_unaligned_v<16>(xr + j)));
      absmax = aie::reduce_max(vmax);
    }
#endif
    for (int32_t j = n16; j < n; ++j) {
      const float a = fabsf(xr[j]);
      if (a > absmax) absmax = a;
    }
    const bool zero = absmax == 0.0f;
    const float safe = zero ? 1.0f : absmax;
    const float inv = top / safe;
    scale[i] = zero ? 0.0f : safe / top;
#if STREAMD_AIE2
    // |x * inv| <= 32767 (plus rounding), well inside vrint_i32's exact range.
    for (int32_t j = 0; j < n16; j += 16) {
      const streamd::v16f y = streamd::vmul(aie::load_unaligned_v<16>(xr + j), inv);
      aie::store_unaligned_v(qr + j, narrow<T>(streamd::vrint_i32(y)));
    }
#endif
    for (int32_t j = n16; j < n; ++j) qr[j] = quantize_one<T>(xr[j], inv);
  }
}

}  // namespace

extern "C" {

void requant_i32_i8(const int32_t* acc, const int32_t* mult, const int8_t* shift, int8_t* out, int32_t m, int32_t n) {
#if STREAMD_AIE2
  streamd::SrsModes modes;
  const int32_t n16 = n / 16 * 16;
#else
  const int32_t n16 = 0;
#endif
  for (int32_t i = 0; i < m; ++i) {
    const int64_t row = (int64_t)i * n;
#if STREAMD_AIE2
    for (int32_t j = 0; j < n16; j += 16) requant_16(acc + row + j, mult + j, shift + j, out + row + j);
#endif
    for (int32_t j = n16; j < n; ++j) out[row + j] = requant_one(acc[row + j], mult[j], shift[j]);
  }
}

void quantize_rows_f32_i8(const float* x, int8_t* q, float* scale, int32_t m, int32_t n) {
  quantize_rows<int8_t>(x, q, scale, m, n);
}

void quantize_rows_f32_i16(const float* x, int16_t* q, float* scale, int32_t m, int32_t n) {
  quantize_rows<int16_t>(x, q, scale, m, n);
}

void dequant_i32_f32(const int32_t* acc, const float* row_scale, const float* col_scale, const float* bias,
                     const float* residual, float* out, int32_t m, int32_t n) {
#if STREAMD_AIE2
  const int32_t n16 = n / 16 * 16;
#else
  const int32_t n16 = 0;
#endif
  for (int32_t i = 0; i < m; ++i) {
    const int64_t row = (int64_t)i * n;
#if STREAMD_AIE2
    for (int32_t j = 0; j < n16; j += 16) {
      streamd::v16f y = aie::to_float<float>(aie::load_unaligned_v<16>(acc + row + j), 0);
      y = streamd::vmul(y, row_scale[i]);
      y = streamd::vmul(y, aie::load_unaligned_v<16>(col_scale + j));
      if (bias) y = aie::add(y, aie::load_unaligned_v<16>(bias + j));
      if (residual) y = aie::add(aie::load_unaligned_v<16>(residual + row + j), y);
      aie::store_unaligned_v(out + row + j, y);
    }
#endif
    for (int32_t j = n16; j < n; ++j)
      out[row + j] = dequant_one(acc[row + j], row_scale[i], col_scale[j], bias, residual, j, row + j);
  }
}

}  // extern "C"
