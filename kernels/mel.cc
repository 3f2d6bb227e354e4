// The mel front end: an integer DFT and a float32 mel/log stage (golden: npu/golden/mel.py).
//
//   dft_i16_i32(frames[f, k], basis[k, n], out[f, n], f, k, n):
//       out = saturate_i32(srs(sum_t int64(frames[., t]) * basis[t, .], DFT_SHIFT))  (k = 400, n = 402)
//   mel_log_f32(spec[f, 402], logmel[f, 80], f):
//       power = re * re + im * im (re, im interleaved in spec), the 80 Slaney filters as
//       fixed-order sparse sums (MEL_FIRST/COUNT/WEIGHT), floored at 1e-10, then log10 from
//       the log2 table: exponent + interpolated LOG2_TABLE, times log10(2).
#include "numerics.h"
#include "tables.h"

namespace {

const int DFT_SHIFT = 8;  // npu.golden.mel.DFT_SHIFT: the int32 DFT is 2**22 x the float STFT
const int32_t N_BINS = 201;
const int32_t SPEC_COLS = 2 * N_BINS;
const float LOG10_2 = 0x1.344136p-2f;     // float32(log10(2))
const float FLOOR = 0x1.b7cdfep-34f;      // float32(1e-10)
const int FRAC_BITS = 23 - LOG2_BITS;     // mantissa bits below the table index
const float FRAC_SCALE = 1.0f / (float)(1 << FRAC_BITS);

// out[f0:f1, j0:j1] from the full depth k. Column blocks of 32 keep the int64 sums on the stack.
void dft_block(const int16_t* frames, const int16_t* basis, int32_t* out, int32_t k, int32_t n, int32_t f0,
               int32_t f1, int32_t j0, int32_t j1) {
  for (int32_t f = f0; f < f1; ++f) {
    const int16_t* frame = frames + (int64_t)f * k;
    for (int32_t jb = j0; jb < j1; jb += 32) {
      const int32_t width = j1 - jb < 32 ? j1 - jb : 32;
      int64_t acc[32] = {0};
      for (int32_t t = 0; t < k; ++t) {
        const int32_t s = frame[t];
        const int16_t* brow = basis + (int64_t)t * n + jb;
        for (int32_t q = 0; q < width; ++q) acc[q] += (int64_t)(s * (int32_t)brow[q]);
      }
      int32_t* orow = out + (int64_t)f * n + jb;
      for (int32_t q = 0; q < width; ++q) orow[q] = streamd::saturate_i32(streamd::shift_round_even(acc[q], DFT_SHIFT));
    }
  }
}

// log10 of a normal positive float, as npu.golden.mel.log10_positive computes it.
inline float log10_positive(float x) {
  const uint32_t bits = streamd::float_bits(x);
  const int32_t exponent = (int32_t)((bits >> 23) & 0xFF) - 127;
  const uint32_t mantissa = bits & 0x7FFFFFu;
  const uint32_t index = mantissa >> FRAC_BITS;
  const float frac = (float)(mantissa & ((1u << FRAC_BITS) - 1)) * FRAC_SCALE;
  const float here = LOG2_TABLE[index];
  const float step = LOG2_TABLE[index + 1] - here;
  const float log2 = (float)exponent + (here + step * frac);
  return log2 * LOG10_2;
}

// The 80 band sums of one frame's power spectrum, each in its fixed order, floored.
inline void mel_bands(const float* power, float* bands) {
  int32_t offset = 0;
  for (int32_t j = 0; j < MEL_BANDS; ++j) {
    const int32_t lo = MEL_FIRST[j], count = MEL_COUNT[j];
    float acc = 0.0f;
    for (int32_t i = 0; i < count; ++i) acc = acc + MEL_WEIGHT[offset + i] * power[lo + i];
    offset += count;
    bands[j] = acc < FLOOR ? FLOOR : acc;
  }
}

inline float power_one(const int32_t* spec, int32_t b) {
  const float re = (float)spec[2 * b], im = (float)spec[2 * b + 1];
  const float p = re * re;
  return p + im * im;
}

#if STREAMD_AIE2
using streamd::v16f;
using streamd::v16i;

// aie::mmul 4x4x8 int16 x int16 with a 64-bit accumulator: the sums stay exact (< 2**39).
using DFT_MMUL = aie::mmul<4, 4, 8, int16_t, int16_t, acc64>;
using v16i16 = aie::vector<int16_t, 16>;
using v32i16 = aie::vector<int16_t, 32>;

// Frames i..i+3, samples p..p+15 -> four 4x4 A blocks (samples p, p+4, p+8, p+12).
inline void load_frame_blocks(const int16_t* frames, int32_t k, v16i16 out[4]) {
  const v16i16 r0 = aie::load_unaligned_v<16>(frames);
  const v16i16 r1 = aie::load_unaligned_v<16>(frames + k);
  const v16i16 r2 = aie::load_unaligned_v<16>(frames + 2 * k);
  const v16i16 r3 = aie::load_unaligned_v<16>(frames + 3 * k);
  const auto z01 = aie::interleave_zip(r0, r1, 4);  // r0 g0 | r1 g0 | r0 g1 | r1 g1 || r0 g2 ...
  const auto z23 = aie::interleave_zip(r2, r3, 4);
  const auto lo = aie::interleave_zip(z01.first, z23.first, 8);  // r0 g | r1 g | r2 g | r3 g
  const auto hi = aie::interleave_zip(z01.second, z23.second, 8);
  out[0] = lo.first;
  out[1] = lo.second;
  out[2] = hi.first;
  out[3] = hi.second;
}

// Samples p..p+3, bins columns j..j+7 of the basis -> one 4x8 B block.
inline v32i16 load_basis_block(const int16_t* basis, int32_t n) {
  return aie::concat(aie::load_unaligned_v<8>(basis), aie::load_unaligned_v<8>(basis + n),
                     aie::load_unaligned_v<8>(basis + 2 * n), aie::load_unaligned_v<8>(basis + 3 * n));
}

// out[0:4, 0:16] (two 4x8 blocks) over the full depth k (a multiple of 16).
inline void dft_4x16(const int16_t* frames, const int16_t* basis, int32_t* out, int32_t k, int32_t n) {
  DFT_MMUL acc0(aie::zeros<acc64, 32>()), acc1(aie::zeros<acc64, 32>());
  for (int32_t p = 0; p < k; p += 16) STREAMD_PIPELINE {
      v16i16 a[4];
      load_frame_blocks(frames + p, k, a);
      for (int g = 0; g < 4; ++g) {
        const int16_t* brow = basis + (int64_t)(p + 4 * g) * n;
        acc0.mac(a[g], load_basis_block(brow, n));
        acc1.mac(a[g], load_basis_block(brow + 8, n));
      }
    }
  const aie::vector<int32_t, 32> t0 = acc0.template to_vector<int32_t>(DFT_SHIFT);  // srs: conv_even, saturate
  const aie::vector<int32_t, 32> t1 = acc1.template to_vector<int32_t>(DFT_SHIFT);
  for (int r = 0; r < 4; ++r) {
    aie::store_unaligned_v(out + (int64_t)r * n, t0.template extract<8>(r));
    aie::store_unaligned_v(out + (int64_t)r * n + 8, t1.template extract<8>(r));
  }
}

inline v16f vlog10_positive(const v16f& x) {
  const v16i bits = aie::vector_cast<int32_t>(x);
  const v16i exponent = aie::sub(aie::bit_and(0xFF, aie::downshift(bits, 23)), 127);
  const v16i mantissa = aie::bit_and(0x7FFFFF, bits);
  const v16i index = aie::downshift(mantissa, FRAC_BITS);
  const v16f frac = aie::to_float<float>(aie::bit_and((1 << FRAC_BITS) - 1, mantissa), FRAC_BITS);  // exact
  const v16f here = streamd::vgather(LOG2_TABLE, index);
  const v16f step = aie::sub(streamd::vgather(LOG2_TABLE + 1, index), here);
  const v16f log2 = aie::add(aie::to_float<float>(exponent, 0), aie::add(here, streamd::vmul(step, frac)));
  return streamd::vmul(log2, LOG10_2);
}
#endif

}  // namespace

extern "C" {

void dft_i16_i32(const int16_t* frames, const int16_t* basis, int32_t* out, int32_t f, int32_t k, int32_t n) {
#if STREAMD_AIE2
  streamd::SrsModes modes;
  if (k > 0 && k % 16 == 0) {
    const int32_t f4 = f / 4 * 4, n16 = n / 16 * 16;
    for (int32_t i = 0; i < f4; i += 4)
      for (int32_t j = 0; j < n16; j += 16)
        dft_4x16(frames + (int64_t)i * k, basis + j, out + (int64_t)i * n + j, k, n);
    dft_block(frames, basis, out, k, n, 0, f4, n16, n);  // right columns (402 = 25 * 16 + 2)
    dft_block(frames, basis, out, k, n, f4, f, 0, n);    // bottom frames
    return;
  }
#endif
  dft_block(frames, basis, out, k, n, 0, f, 0, n);
}

void mel_log_f32(const int32_t* spec, float* logmel, int32_t f) {
  float power[N_BINS];
  float bands[MEL_BANDS];
  for (int32_t i = 0; i < f; ++i) {
    const int32_t* row = spec + (int64_t)i * SPEC_COLS;
    float* out = logmel + (int64_t)i * MEL_BANDS;
    int32_t b = 0;
#if STREAMD_AIE2
    for (; b + 16 <= N_BINS; b += 16) {
      // 32 interleaved int32 (re, im) -> 16 re and 16 im; int32 -> float rounds to nearest even.
      const auto parts =
          aie::interleave_unzip(aie::load_unaligned_v<16>(row + 2 * b), aie::load_unaligned_v<16>(row + 2 * b + 16), 1);
      const v16f re = aie::to_float<float>(parts.first, 0), im = aie::to_float<float>(parts.second, 0);
      aie::store_unaligned_v(power + b, aie::add(streamd::vmul(re, re), streamd::vmul(im, im)));
    }
#endif
    for (; b < N_BINS; ++b) power[b] = power_one(row, b);
    // The band sums are short dependent chains (391 weights over 80 bands): scalar, in order.
    mel_bands(power, bands);
    int32_t j = 0;
#if STREAMD_AIE2
    for (; j + 16 <= MEL_BANDS; j += 16)
      aie::store_unaligned_v(out + j, vlog10_positive(aie::load_unaligned_v<16>(bands + j)));
#endif
    for (; j < MEL_BANDS; ++j) out[j] = log10_positive(bands[j]);
  }
}

}  // extern "C"
