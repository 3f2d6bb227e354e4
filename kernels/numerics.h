// The arithmetic every kernel shares, mirroring npu/golden/numerics.py op for op.
//
// Two builds of the same source:
//   - host: plain scalar C++ (g++/clang++ -O2 -std=c++17 -ffp-contract=off, no -ffast-math),
//     compiled by npu/golden/host.py and checked bit for bit against the golden models;
//   - AIE2 (Phoenix npu1): Peano (llvm-aie) or xchesscc define __AIENGINE__; the kernels then
//     take their aie_api vector paths, which follow the same op sequence. Those paths have never
//     been compiled with the real aie_api (no AIE toolchain here); the host runs them against a
//     model of the API (-DSTREAMD_AIE_MODEL, kernels/aie_api_model.h). See kernels/README.md.
// Define STREAMD_SCALAR_ONLY to force the scalar paths on an AIE build (for A/B checks there).
#pragma once

#include <math.h>
#include <stdint.h>
#include <string.h>

#if defined(__AIENGINE__) && !defined(STREAMD_SCALAR_ONLY)
#define STREAMD_AIE2 1
#include <aie_api/aie.hpp>
#elif defined(STREAMD_AIE_MODEL)
// Host build of the vector paths against a model of aie_api (kernels/aie_api_model.h).
#define STREAMD_AIE2 1
#include "aie_api_model.h"
#else
#define STREAMD_AIE2 0
#endif

// Loop hint for the vector loops: xchesscc understands it, Peano pipelines on its own.
#if defined(__chess__)
#define STREAMD_PIPELINE chess_prepare_for_pipelining
#else
#define STREAMD_PIPELINE
#endif

// Float reductions run in this many lanes: element i goes to lane i % LANES, in order, then
// the lanes are added as a tree (lane l += lane l + w for w = 8, 4, 2, 1).
#define STREAMD_LANES 16

namespace streamd {

// ---- bit views ------------------------------------------------------------------------------

static inline uint32_t float_bits(float x) {
  uint32_t u;
  memcpy(&u, &x, sizeof u);
  return u;
}

static inline float bits_float(uint32_t u) {
  float x;
  memcpy(&x, &u, sizeof x);
  return x;
}

// ---- integer rescaling --------------------------------------------------------------------

// The srs shifts the kernels take: 1..59. AIE2's accumulator srs shifts right by at most 59
// (AIE-ML intrinsics: -4..59), and the golden model (numerics.srs) allows exactly 1..59.
#define STREAMD_SRS_MIN_SHIFT 1
#define STREAMD_SRS_MAX_SHIFT 59

// Out-of-range shifts are clamped into 1..59, the same way on every path (the host wrappers
// reject them, as the golden model does).
static inline int clamp_shift(int shift) {
  return shift < STREAMD_SRS_MIN_SHIFT ? STREAMD_SRS_MIN_SHIFT
                                       : (shift > STREAMD_SRS_MAX_SHIFT ? STREAMD_SRS_MAX_SHIFT : shift);
}

// Shift right by `shift` (1..59, clamped) rounding half to even: the accumulator's srs with
// rounding_mode::conv_even, before saturation.
static inline int64_t shift_round_even(int64_t x, int shift) {
  shift = clamp_shift(shift);
  const int64_t q = x >> shift;  // arithmetic: floor(x / 2**shift)
  const uint64_t r = (uint64_t)x & ((UINT64_C(1) << shift) - 1);
  const uint64_t half = UINT64_C(1) << (shift - 1);
  return q + ((r > half || (r == half && (q & 1))) ? 1 : 0);
}

static inline int8_t saturate_i8(int64_t v) {
  return (int8_t)(v < -128 ? -128 : (v > 127 ? 127 : v));
}

static inline int32_t saturate_i32(int64_t v) {
  return (int32_t)(v < INT32_MIN ? INT32_MIN : (v > INT32_MAX ? INT32_MAX : v));
}

// ---- float reductions in lane order -------------------------------------------------------

// Lanes start at +0.0f, so a lane is never -0.0f and adding +0.0f to one is exact: the
// vector paths rely on that to pad partial vectors with zeros.
static inline void lanes_clear(float lanes[STREAMD_LANES]) {
  for (int l = 0; l < STREAMD_LANES; ++l) lanes[l] = 0.0f;
}

static inline float lanes_tree(float lanes[STREAMD_LANES]) {
  for (int width = STREAMD_LANES / 2; width > 0; width /= 2)
    for (int l = 0; l < width; ++l) lanes[l] = lanes[l] + lanes[l + width];
  return lanes[0];
}

// sum(x[0:n]) in lane order (npu.golden.numerics.lane_sum).
static inline float lane_sum(const float* x, int32_t n) {
  float lanes[STREAMD_LANES];
  lanes_clear(lanes);
  for (int32_t i = 0; i < n; ++i) lanes[i % STREAMD_LANES] = lanes[i % STREAMD_LANES] + x[i];
  return lanes_tree(lanes);
}

#if STREAMD_AIE2
// ---- AIE2 vector helpers (unverified until built with Peano) -----------------------------

using v16f = aie::vector<float, 16>;
using v16i = aie::vector<int32_t, 16>;

// Sets conv_even rounding and saturation for srs (accumulator -> vector) for one kernel call,
// and restores the caller's modes.
struct SrsModes {
  aie::rounding_mode rounding;
  aie::saturation_mode saturation;
  SrsModes()
      : rounding(aie::swap_rounding(aie::rounding_mode::conv_even)),
        saturation(aie::swap_saturation(aie::saturation_mode::saturate)) {}
  ~SrsModes() {
    aie::set_rounding(rounding);
    aie::set_saturation(saturation);
  }
};

// a * b, one float rounding per lane. NOTE: AIE2 has no fp32 multiplier; aie_api emulates it
// with bf16 products, whose rounding is not yet shown to equal IEEE (kernels/README.md).
static inline v16f vmul(const v16f& a, const v16f& b) { return aie::mul(a, b).template to_vector<float>(); }
static inline v16f vmul(const v16f& a, float b) { return aie::mul(a, b).template to_vector<float>(); }

// floor() of floats with |x| < 2**23, whatever rounding to_fixed applies (nearest or toward
// zero): round, then step down where the rounded value lies above x.
static inline v16i vfloor_i32(const v16f& x) {
  v16i r = aie::to_fixed<int32_t>(x, 0);
  v16f back = aie::to_float<float>(r, 0);
  return aie::select(r, aie::sub(r, 1), aie::gt(back, x));
}

// Round half to even (rintf) for |x| < 2**22, built on vfloor_i32 so it does not depend on the
// conversion's tie rule.
static inline v16i vrint_i32(const v16f& x) {
  v16i lo = vfloor_i32(x);
  v16f frac = aie::sub(x, aie::to_float<float>(lo, 0));  // exact, in [0, 1)
  aie::mask<16> odd = aie::eq(aie::bit_and((int32_t)1, lo), 1);
  aie::mask<16> up = aie::gt(frac, 0.5f) | (aie::eq(frac, 0.5f) & odd);
  return aie::select(lo, aie::add(lo, 1), up);
}

// table[index[l]] for each lane: AIE2 has no float gather, so 16 scalar loads.
static inline v16f vgather(const float* table, const v16i& index) {
  v16f out;
  for (unsigned l = 0; l < 16; ++l) out.set(table[index.get(l)], l);
  return out;
}

// Accumulate 16 consecutive elements into the 16 lanes (element i -> lane i % 16 holds as
// long as chunks start at multiples of 16).
static inline v16f vlanes_add(const v16f& lanes, const v16f& x) { return aie::add(lanes, x); }

// Copies the lane accumulators out (element-wise: no alignment needed) for the scalar tail and
// the tree, which run on the scalar unit in IEEE arithmetic.
static inline void vlanes_store(float lanes[STREAMD_LANES], const v16f& v) {
  for (unsigned l = 0; l < 16; ++l) lanes[l] = v.get(l);
}
#endif

}  // namespace streamd
