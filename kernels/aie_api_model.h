// A host model of the small part of aie_api the kernels' vector paths use, written from the
// AIE API documentation (UG1529 / xilinx.github.io/aie_api). Built with -DSTREAMD_AIE_MODEL by
// npu/golden/host.py so the tests can run the vector paths' logic on the host: the tiling, the
// interleaves, masks, lane order and tails, the srs modes. It is NOT aie_api and NOT the
// hardware: floats here are IEEE float32 (on AIE2, fp32 multiplies are emulated with bf16
// products and subnormals may flush), and the API surface is only what the kernels call.
#pragma once

#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <initializer_list>
#include <limits>
#include <type_traits>
#include <utility>

// Accumulator tags, global as in aie_api.
struct acc32 {};
struct acc64 {};
struct accfloat {};

namespace aie {

enum class rounding_mode : unsigned { floor = 0, conv_even = 1 };
enum class saturation_mode : unsigned { none = 0, saturate = 1 };

namespace detail {
// AIE2 comes out of reset truncating (floor) without saturation; the kernels must set modes.
inline rounding_mode& rounding() {
  static rounding_mode mode = rounding_mode::floor;
  return mode;
}
inline saturation_mode& saturation() {
  static saturation_mode mode = saturation_mode::none;
  return mode;
}

template <typename T>
T saturate_or_wrap(int64_t v) {
  if (saturation() == saturation_mode::saturate) {
    const int64_t lo = (int64_t)std::numeric_limits<T>::min(), hi = (int64_t)std::numeric_limits<T>::max();
    return (T)(v < lo ? lo : (v > hi ? hi : v));
  }
  return (T)(uint64_t)v;  // modular
}

// Shift-round-saturate of one accumulator lane, by the current modes. AIE2's srs takes shifts
// -4..59 (AIE-ML intrinsics guide); the kernels only shift right, so 0..59 here.
template <typename T>
T srs(int64_t x, int shift) {
  if (shift < 0 || shift > 59) {
    fprintf(stderr, "aie_api model: srs shift %d is outside the hardware's range\n", shift);
    abort();
  }
  if (shift == 0) return saturate_or_wrap<T>(x);
  const int64_t q = x >> shift;
  const uint64_t r = (uint64_t)x & ((UINT64_C(1) << shift) - 1);
  const uint64_t half = UINT64_C(1) << (shift - 1);
  int64_t out = q;
  if (rounding() == rounding_mode::conv_even) out += (r > half || (r == half && (q & 1))) ? 1 : 0;
  return saturate_or_wrap<T>(out);
}
}  // namespace detail

inline rounding_mode swap_rounding(rounding_mode m) { return std::exchange(detail::rounding(), m); }
inline saturation_mode swap_saturation(saturation_mode m) { return std::exchange(detail::saturation(), m); }
inline void set_rounding(rounding_mode m) { detail::rounding() = m; }
inline void set_saturation(saturation_mode m) { detail::saturation() = m; }

template <typename T, unsigned N>
struct vector {
  static_assert(N * sizeof(T) * 8 >= 128 && N * sizeof(T) * 8 <= 1024, "aie::vector is 128 to 1024 bits");
  using value_type = T;
  T v[N];
  static constexpr unsigned size() { return N; }
  T get(unsigned i) const { return v[i]; }
  void set(T x, unsigned i) { v[i] = x; }
  template <unsigned M>
  vector<T, M> extract(unsigned idx) const {
    vector<T, M> out;
    for (unsigned i = 0; i < M; ++i) out.v[i] = v[idx * M + i];
    return out;
  }
};

template <unsigned N>
struct mask {
  uint32_t bits = 0;
  static mask from_uint32(uint32_t b) { return mask{b & (N >= 32 ? 0xFFFFFFFFu : ((1u << N) - 1))}; }
  bool test(unsigned i) const { return (bits >> i) & 1u; }
  mask operator&(const mask& o) const { return mask{bits & o.bits}; }
  mask operator|(const mask& o) const { return mask{bits | o.bits}; }
};

template <typename Tag>
using acc_value_t = std::conditional_t<std::is_same_v<Tag, accfloat>, float, int64_t>;

template <typename Tag, unsigned N>
struct accum {
  using value_type = acc_value_t<Tag>;
  value_type v[N];
  template <typename T>
  vector<T, N> to_vector(int shift = 0) const {
    vector<T, N> out;
    for (unsigned i = 0; i < N; ++i) {
      if constexpr (std::is_same_v<Tag, accfloat>)
        out.v[i] = (T)v[i];
      else
        out.v[i] = detail::srs<T>(v[i], shift);
    }
    return out;
  }
  template <typename T>
  void from_vector(const vector<T, N>& x, int shift = 0) {
    for (unsigned i = 0; i < N; ++i) v[i] = (value_type)((int64_t)x.v[i] * ((int64_t)1 << shift));
  }
};

// ---- construction, memory -------------------------------------------------------------------

template <typename T, unsigned N, typename = std::enable_if_t<std::is_arithmetic_v<T>>>
vector<T, N> zeros() {
  vector<T, N> out;
  for (unsigned i = 0; i < N; ++i) out.v[i] = T(0);
  return out;
}
template <typename Tag, unsigned N, typename = std::enable_if_t<!std::is_arithmetic_v<Tag>>>
accum<Tag, N> zeros() {
  accum<Tag, N> out;
  for (unsigned i = 0; i < N; ++i) out.v[i] = 0;
  return out;
}
template <typename T, unsigned N>
vector<T, N> broadcast(T x) {
  vector<T, N> out;
  for (unsigned i = 0; i < N; ++i) out.v[i] = x;
  return out;
}
template <unsigned N, typename T>
vector<std::remove_const_t<T>, N> load_unaligned_v(T* p) {
  vector<std::remove_const_t<T>, N> out;
  memcpy(out.v, p, sizeof out.v);
  return out;
}
template <typename T, unsigned N>
T* store_unaligned_v(T* p, const vector<T, N>& x) {
  memcpy(p, x.v, sizeof x.v);
  return p;
}

template <typename T, unsigned N, typename... Rest>
auto concat(const vector<T, N>& first, const Rest&... rest) {
  constexpr unsigned total = N * (1 + sizeof...(Rest));
  vector<T, total> out;
  const vector<T, N>* parts[] = {&first, &rest...};
  for (unsigned p = 0; p < 1 + sizeof...(Rest); ++p)
    for (unsigned i = 0; i < N; ++i) out.v[p * N + i] = parts[p]->v[i];
  return out;
}

template <typename To, typename From, unsigned N>
vector<To, N * sizeof(From) / sizeof(To)> vector_cast(const vector<From, N>& x) {
  vector<To, N * sizeof(From) / sizeof(To)> out;
  memcpy(out.v, x.v, sizeof x.v);
  return out;
}

// ---- element-wise arithmetic ----------------------------------------------------------------

#define STREAMD_MODEL_BINARY(name, expr)                                       \
  template <typename T, unsigned N>                                            \
  vector<T, N> name(const vector<T, N>& a, const vector<T, N>& b) {            \
    vector<T, N> out;                                                          \
    for (unsigned i = 0; i < N; ++i) {                                         \
      const T x = a.v[i], y = b.v[i];                                          \
      out.v[i] = (expr);                                                       \
    }                                                                          \
    return out;                                                                \
  }                                                                            \
  template <typename T, unsigned N, typename E,                                \
            typename = std::enable_if_t<std::is_arithmetic_v<E>>>             \
  vector<T, N> name(const vector<T, N>& a, E b) {                              \
    return name(a, broadcast<T, N>((T)b));                                     \
  }                                                                            \
  template <typename E, typename T, unsigned N,                                \
            typename = std::enable_if_t<std::is_arithmetic_v<E>>>             \
  vector<T, N> name(E a, const vector<T, N>& b) {                              \
    return name(broadcast<T, N>((T)a), b);                                     \
  }

STREAMD_MODEL_BINARY(add, (T)(x + y))
STREAMD_MODEL_BINARY(sub, (T)(x - y))
STREAMD_MODEL_BINARY(max, x > y ? x : y)
STREAMD_MODEL_BINARY(min, x < y ? x : y)
STREAMD_MODEL_BINARY(bit_and, (T)(x & y))
#undef STREAMD_MODEL_BINARY

template <unsigned N>
vector<float, N> abs(const vector<float, N>& a) {
  vector<float, N> out;
  for (unsigned i = 0; i < N; ++i) out.v[i] = fabsf(a.v[i]);
  return out;
}

template <typename T, unsigned N>
T reduce_max(const vector<T, N>& a) {
  T m = a.v[0];
  for (unsigned i = 1; i < N; ++i) m = a.v[i] > m ? a.v[i] : m;
  return m;
}

template <typename T, unsigned N>
vector<T, N> downshift(const vector<T, N>& a, unsigned s) {
  vector<T, N> out;
  for (unsigned i = 0; i < N; ++i) out.v[i] = (T)(a.v[i] >> s);  // arithmetic for signed T
  return out;
}
template <typename T, unsigned N>
vector<T, N> upshift(const vector<T, N>& a, unsigned s) {
  vector<T, N> out;
  for (unsigned i = 0; i < N; ++i) out.v[i] = (T)(std::make_unsigned_t<T>)((std::make_unsigned_t<T>)a.v[i] << s);
  return out;
}

// Multiplies return accumulators: floats rounded once (IEEE here; bf16-emulated on AIE2).
template <unsigned N>
accum<accfloat, N> mul(const vector<float, N>& a, const vector<float, N>& b) {
  accum<accfloat, N> out;
  for (unsigned i = 0; i < N; ++i) out.v[i] = a.v[i] * b.v[i];
  return out;
}
template <unsigned N>
accum<accfloat, N> mul(const vector<float, N>& a, float b) {
  return mul(a, broadcast<float, N>(b));
}
template <typename Tag, typename T, unsigned N>
accum<Tag, N> mul(const vector<T, N>& a, const vector<T, N>& b) {
  static_assert(std::is_integral_v<T>, "integer multiply");
  accum<Tag, N> out;
  for (unsigned i = 0; i < N; ++i) out.v[i] = (int64_t)a.v[i] * (int64_t)b.v[i];
  return out;
}

// ---- comparisons and selection ----------------------------------------------------------------

#define STREAMD_MODEL_CMP(name, op)                                                          \
  template <typename T, unsigned N>                                                          \
  mask<N> name(const vector<T, N>& a, const vector<T, N>& b) {                               \
    mask<N> m;                                                                               \
    for (unsigned i = 0; i < N; ++i)                                                         \
      if (a.v[i] op b.v[i]) m.bits |= 1u << i;                                               \
    return m;                                                                                \
  }                                                                                          \
  template <typename T, unsigned N, typename E, typename = std::enable_if_t<std::is_arithmetic_v<E>>> \
  mask<N> name(const vector<T, N>& a, E b) {                                                 \
    return name(a, broadcast<T, N>((T)b));                                                   \
  }

STREAMD_MODEL_CMP(lt, <)
STREAMD_MODEL_CMP(gt, >)
STREAMD_MODEL_CMP(ge, >=)
STREAMD_MODEL_CMP(eq, ==)
#undef STREAMD_MODEL_CMP

// out[i] = m[i] ? b[i] : a[i]
template <typename T, unsigned N>
vector<T, N> select(const vector<T, N>& a, const vector<T, N>& b, const mask<N>& m) {
  vector<T, N> out;
  for (unsigned i = 0; i < N; ++i) out.v[i] = m.test(i) ? b.v[i] : a.v[i];
  return out;
}
template <typename T, unsigned N, typename E, typename = std::enable_if_t<std::is_arithmetic_v<E>>>
vector<T, N> select(const vector<T, N>& a, E b, const mask<N>& m) {
  return select(a, broadcast<T, N>((T)b), m);
}

// ---- conversions ------------------------------------------------------------------------------

// float -> fixed, rounding to nearest even (as documented for AIE2's vector conversion).
template <typename TR, unsigned N>
vector<TR, N> to_fixed(const vector<float, N>& x, int shift = 0) {
  vector<TR, N> out;
  for (unsigned i = 0; i < N; ++i) out.v[i] = (TR)rintf(ldexpf(x.v[i], shift));
  return out;
}
template <typename TR, typename T, unsigned N>
vector<TR, N> to_float(const vector<T, N>& x, int shift = 0) {
  vector<TR, N> out;
  for (unsigned i = 0; i < N; ++i) out.v[i] = ldexpf((float)x.v[i], -shift);
  return out;
}

// ---- reshaping --------------------------------------------------------------------------------

// (first, second) = v[0:c] w[0:c] v[c:2c] w[c:2c] ...
template <typename T, unsigned N>
std::pair<vector<T, N>, vector<T, N>> interleave_zip(const vector<T, N>& v, const vector<T, N>& w, unsigned chunk) {
  T seq[2 * N];
  unsigned k = 0;
  for (unsigned base = 0; base < N; base += chunk) {
    for (unsigned i = 0; i < chunk; ++i) seq[k++] = v.v[base + i];
    for (unsigned i = 0; i < chunk; ++i) seq[k++] = w.v[base + i];
  }
  std::pair<vector<T, N>, vector<T, N>> out;
  memcpy(out.first.v, seq, sizeof out.first.v);
  memcpy(out.second.v, seq + N, sizeof out.second.v);
  return out;
}
// The inverse of interleave_zip.
template <typename T, unsigned N>
std::pair<vector<T, N>, vector<T, N>> interleave_unzip(const vector<T, N>& v, const vector<T, N>& w, unsigned chunk) {
  T seq[2 * N];
  memcpy(seq, v.v, sizeof v.v);
  memcpy(seq + N, w.v, sizeof w.v);
  std::pair<vector<T, N>, vector<T, N>> out;
  unsigned k = 0, a = 0, b = 0;
  while (k < 2 * N) {
    for (unsigned i = 0; i < chunk; ++i) out.first.v[a++] = seq[k++];
    for (unsigned i = 0; i < chunk; ++i) out.second.v[b++] = seq[k++];
  }
  return out;
}

// ---- matrix multiply --------------------------------------------------------------------------

// The aie::mmul instances AIE-ML/XDNA1 has, for the operand types the kernels use: the AIE API
// user guide's "Matrix Multiplication" table (row AIE-ML/XDNA 1) and the specialisations in
// aie_api's detail/aie2/mmul_{8_8,16_8,16_16}.hpp (int16 x int8 exists with AccumBits 32 only;
// int16 x int16 4x4x8 with either width). The model refuses any other, so a shape or
// accumulator the hardware lacks fails to build here too.
template <unsigned M, unsigned K, unsigned N, typename TA, typename TB, typename Tag>
constexpr bool mmul_supported() {
  const unsigned shape = M * 10000 + K * 100 + N;
  auto any = [shape](std::initializer_list<unsigned> shapes) {
    for (unsigned s : shapes)
      if (s == shape) return true;
    return false;
  };
  constexpr bool a8 = std::is_same_v<TA, int8_t>, a16 = std::is_same_v<TA, int16_t>;
  constexpr bool b8 = std::is_same_v<TB, int8_t>, b16 = std::is_same_v<TB, int16_t>;
  constexpr bool t32 = std::is_same_v<Tag, acc32>, t64 = std::is_same_v<Tag, acc64>;
  if (a8 && b8 && t32)  // 8b x 8b: 4x8x4 4x16x4 8x8x4 2x8x8 4x8x8 8x8x8 1x16x8 2x16x8 4x16x8
    return any({40804, 41604, 80804, 20808, 40808, 80808, 11608, 21608, 41608});
  if (a16 && b8 && t32)  // 16b x 8b: 4x4x4 8x4x4 4x8x4 4x4x8 (one native mac_4x4_4x8) 8x4x8 2x8x8
    return any({40404, 80404, 40804, 40408, 80408, 20808});
  if (a16 && b16 && (t32 || t64))  // 16b x 16b: 4x4x4 2x4x8 4x4x8, and 4x2x8 8x2x8 8x1x8 with acc32
    return any({40404, 20408, 40408}) || (t32 && any({40208, 80208, 80108}));
  return false;
}

// C (M x N, row-major) += A (M x K, row-major) . B (K x N, row-major), in the accumulator.
template <unsigned M, unsigned K, unsigned N, typename TA, typename TB, typename Tag>
struct mmul {
  static_assert(mmul_supported<M, K, N, TA, TB, Tag>(), "aie::mmul shape/types not available on AIE-ML (model)");
  static constexpr unsigned size_A = M * K, size_B = K * N, size_C = M * N;
  accum<Tag, size_C> data;
  mmul() { data = zeros<Tag, size_C>(); }
  explicit mmul(const accum<Tag, size_C>& acc) : data(acc) {}
  template <typename T>
  explicit mmul(const vector<T, size_C>& c, int shift = 0) {
    data.from_vector(c, shift);
  }
  void mac(const vector<TA, size_A>& a, const vector<TB, size_B>& b) {
    for (unsigned i = 0; i < M; ++i)
      for (unsigned j = 0; j < N; ++j) {
        int64_t s = data.v[i * N + j];
        for (unsigned k = 0; k < K; ++k) s += (int64_t)a.v[i * K + k] * (int64_t)b.v[k * N + j];
        if constexpr (std::is_same_v<Tag, acc32>) s = (int64_t)(int32_t)(uint32_t)(uint64_t)s;  // 32-bit lanes wrap
        data.v[i * N + j] = s;
      }
  }
  template <typename T>
  vector<T, size_C> to_vector(int shift = 0) const {
    return data.template to_vector<T>(shift);
  }
};

}  // namespace aie
