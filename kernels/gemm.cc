// Integer GEMMs accumulating into int32 C (golden: npu/golden/gemm.py).
//
//   void gemm_i8_i32(a[m, k], b[k, n], c[m, n], m, k, n):     c += a . b, int8 x int8
//   void gemm_i16i8_i32(a[m, k], b[k, n], c[m, n], m, k, n):  c += a . b, int16 x int8 (vocabulary projection)
//   void zero_i32(c, count):                                  c[0:count] = 0
//
// Every product and sum is an exact integer, so any summation order gives the same bits; the
// int32 sums wrap mod 2**32 like the AIE2 acc32 does (the golden model keeps K small enough
// that a · b never does: 128 * 128 * K < 2**31 for K <= 2**17 - 1, and 32768 * 128 * K < 2**31
// for K <= 511).
#include "numerics.h"

namespace {

// c[i, j] += sum_p a[i, p] * b[p, j] for i in [i0, i1), j in [j0, j1), p in [p0, p1).
// Each product fits int32 (|a| <= 2**15, |b| <= 2**7); unsigned adds: wrap-around is
// defined, as in the hardware accumulator.
template <typename TA>
void gemm_block(const TA* a, const int8_t* b, int32_t* c, int32_t k, int32_t n, int32_t i0, int32_t i1, int32_t j0,
                int32_t j1, int32_t p0, int32_t p1) {
  for (int32_t i = i0; i < i1; ++i) {
    uint32_t* crow = reinterpret_cast<uint32_t*>(c + (int64_t)i * n);
    const TA* arow = a + (int64_t)i * k;
    for (int32_t p = p0; p < p1; ++p) {
      const int32_t av = arow[p];
      const int8_t* brow = b + (int64_t)p * n;
      for (int32_t j = j0; j < j1; ++j) crow[j] += (uint32_t)(av * (int32_t)brow[j]);
    }
  }
}

#if STREAMD_AIE2
// aie::mmul 4x8x8 int8 x int8 with a 32-bit accumulator: one native VMAC on AIE2.
using MMUL = aie::mmul<4, 8, 8, int8_t, int8_t, acc32>;
using v32i8 = aie::vector<int8_t, 32>;
using v64i8 = aie::vector<int8_t, 64>;

// The operands are row-major (the IRON designs move plain row-major tiles), so the 4x8 and
// 8x8 blocks mmul wants are assembled in registers with 8- and 16-element interleaves.

// Rows i..i+3, columns p..p+31 of A -> the four 4x8 A blocks for k-groups p, p+8, p+16, p+24.
inline void load_a_blocks(const int8_t* a, int32_t k, v32i8 out[4]) {
  const v32i8 r0 = aie::load_unaligned_v<32>(a);
  const v32i8 r1 = aie::load_unaligned_v<32>(a + k);
  const v32i8 r2 = aie::load_unaligned_v<32>(a + 2 * k);
  const v32i8 r3 = aie::load_unaligned_v<32>(a + 3 * k);
  // zip(x, y, 8) = x[0:8] y[0:8] x[8:16] y[8:16] | x[16:24] y[16:24] x[24:32] y[24:32]
  const auto z01 = aie::interleave_zip(r0, r1, 8);
  const auto z23 = aie::interleave_zip(r2, r3, 8);
  // zip(.., 16) then stacks the four rows of each 8-wide group: r0 g | r1 g | r2 g | r3 g.
  const auto lo = aie::interleave_zip(z01.first, z23.first, 16);
  const auto hi = aie::interleave_zip(z01.second, z23.second, 16);
  out[0] = lo.first;
  out[1] = lo.second;
  out[2] = hi.first;
  out[3] = hi.second;
}

// Rows p..p+7, columns j..j+31 of B -> the four 8x8 B blocks for column groups j, j+8, j+16, j+24.
inline void load_b_blocks(const int8_t* b, int32_t n, v64i8 out[4]) {
  v32i8 r[8];
  for (int q = 0; q < 8; ++q) r[q] = aie::load_unaligned_v<32>(b + (int64_t)q * n);
  const auto x01 = aie::interleave_zip(r[0], r[1], 8);
  const auto x23 = aie::interleave_zip(r[2], r[3], 8);
  const auto x45 = aie::interleave_zip(r[4], r[5], 8);
  const auto x67 = aie::interleave_zip(r[6], r[7], 8);
  const auto top01 = aie::interleave_zip(x01.first, x23.first, 16);    // rows 0-3 of groups 0, 1
  const auto top23 = aie::interleave_zip(x01.second, x23.second, 16);  // rows 0-3 of groups 2, 3
  const auto bot01 = aie::interleave_zip(x45.first, x67.first, 16);    // rows 4-7 of groups 0, 1
  const auto bot23 = aie::interleave_zip(x45.second, x67.second, 16);  // rows 4-7 of groups 2, 3
  out[0] = aie::concat(top01.first, bot01.first);
  out[1] = aie::concat(top01.second, bot01.second);
  out[2] = aie::concat(top23.first, bot23.first);
  out[3] = aie::concat(top23.second, bot23.second);
}

// C[0:4, 8g:8g+8] (row stride n) as the 4x8 tile an mmul accumulator starts from, and back.
inline aie::vector<int32_t, 32> load_c_tile(const int32_t* c, int32_t n) {
  return aie::concat(aie::load_unaligned_v<8>(c), aie::load_unaligned_v<8>(c + n),
                     aie::load_unaligned_v<8>(c + 2 * n), aie::load_unaligned_v<8>(c + 3 * n));
}

inline void store_c_tile(int32_t* c, int32_t n, const aie::vector<int32_t, 32>& tile) {
  for (int r = 0; r < 4; ++r) aie::store_unaligned_v(c + (int64_t)r * n, tile.template extract<8>(r));
}

// C[i0:i0+4, j0:j0+32] += A[i0:i0+4, 0:k32] . B[0:k32, j0:j0+32], k32 a multiple of 32.
inline void gemm_4x32(const int8_t* a, const int8_t* b, int32_t* c, int32_t k, int32_t n, int32_t k32) {
  MMUL acc[4];
  for (int g = 0; g < 4; ++g) acc[g] = MMUL(load_c_tile(c + 8 * g, n));
  for (int32_t p = 0; p < k32; p += 32) STREAMD_PIPELINE {
      v32i8 ablk[4];
      load_a_blocks(a + p, k, ablk);
      for (int kg = 0; kg < 4; ++kg) {
        v64i8 bblk[4];
        load_b_blocks(b + (int64_t)(p + 8 * kg) * n, n, bblk);
        for (int g = 0; g < 4; ++g) acc[g].mac(ablk[kg], bblk[g]);
      }
    }
  for (int g = 0; g < 4; ++g) store_c_tile(c + 8 * g, n, acc[g].template to_vector<int32_t>());
}

// ---- int16 x int8 ----
// aie::mmul 4x4x8 int16 x int8 with a 32-bit accumulator: on AIE-ML/XDNA1 a single native
// mac_4x4_4x8 (aie_api detail/aie2/mmul_16_8.hpp; AIE-ML 16b x 8b supports acc32 only). Its A
// block is 4x4 int16 (256 bits), its B block 4x8 int8 (256 bits), its C block 4x8 int32, as
// for the int8 mmul above, so the C tiles load and store the same way.
using MMUL16 = aie::mmul<4, 4, 8, int16_t, int8_t, acc32>;
using v16i16 = aie::vector<int16_t, 16>;

// Rows i..i+3, columns p..p+15 of A -> the four 4x4 A blocks for k-groups p, p+4, p+8, p+12.
inline void load_a16_blocks(const int16_t* a, int32_t k, v16i16 out[4]) {
  const v16i16 r0 = aie::load_unaligned_v<16>(a);
  const v16i16 r1 = aie::load_unaligned_v<16>(a + k);
  const v16i16 r2 = aie::load_unaligned_v<16>(a + 2 * k);
  const v16i16 r3 = aie::load_unaligned_v<16>(a + 3 * k);
  // zip(x, y, 4) = x[0:4] y[0:4] x[4:8] y[4:8] | x[8:12] y[8:12] x[12:16] y[12:16]
  const auto z01 = aie::interleave_zip(r0, r1, 4);
  const auto z23 = aie::interleave_zip(r2, r3, 4);
  // zip(.., 8) then stacks the four rows of each 4-wide group: r0 g | r1 g | r2 g | r3 g.
  const auto lo = aie::interleave_zip(z01.first, z23.first, 8);
  const auto hi = aie::interleave_zip(z01.second, z23.second, 8);
  out[0] = lo.first;
  out[1] = lo.second;
  out[2] = hi.first;
  out[3] = hi.second;
}

// Rows p..p+3, columns j..j+31 of B -> the four 4x8 B blocks for column groups j, j+8, j+16, j+24.
inline void load_b4_blocks(const int8_t* b, int32_t n, v32i8 out[4]) {
  const v32i8 r0 = aie::load_unaligned_v<32>(b);
  const v32i8 r1 = aie::load_unaligned_v<32>(b + n);
  const v32i8 r2 = aie::load_unaligned_v<32>(b + 2 * (int64_t)n);
  const v32i8 r3 = aie::load_unaligned_v<32>(b + 3 * (int64_t)n);
  const auto x01 = aie::interleave_zip(r0, r1, 8);
  const auto x23 = aie::interleave_zip(r2, r3, 8);
  const auto g01 = aie::interleave_zip(x01.first, x23.first, 16);    // groups 0, 1: rows 0-3 each
  const auto g23 = aie::interleave_zip(x01.second, x23.second, 16);  // groups 2, 3
  out[0] = g01.first;
  out[1] = g01.second;
  out[2] = g23.first;
  out[3] = g23.second;
}

// C[i0:i0+4, j0:j0+32] += A[i0:i0+4, 0:k16] . B[0:k16, j0:j0+32], A int16, k16 a multiple of 16.
inline void gemm16_4x32(const int16_t* a, const int8_t* b, int32_t* c, int32_t k, int32_t n, int32_t k16) {
  MMUL16 acc[4];
  for (int g = 0; g < 4; ++g) acc[g] = MMUL16(load_c_tile(c + 8 * g, n));
  for (int32_t p = 0; p < k16; p += 16) STREAMD_PIPELINE {
      v16i16 ablk[4];
      load_a16_blocks(a + p, k, ablk);
      for (int kg = 0; kg < 4; ++kg) {
        v32i8 bblk[4];
        load_b4_blocks(b + (int64_t)(p + 4 * kg) * n, n, bblk);
        for (int g = 0; g < 4; ++g) acc[g].mac(ablk[kg], bblk[g]);
      }
    }
  for (int g = 0; g < 4; ++g) store_c_tile(c + 8 * g, n, acc[g].template to_vector<int32_t>());
}
#endif

}  // namespace

extern "C" {

void zero_i32(int32_t* c, int32_t count) {
  int32_t i = 0;
#if STREAMD_AIE2
  const aie::vector<int32_t, 16> zero = aie::zeros<int32_t, 16>();
  for (; i + 16 <= count; i += 16) aie::store_unaligned_v(c + i, zero);
#endif
  for (; i < count; ++i) c[i] = 0;
}

void gemm_i8_i32(const int8_t* a, const int8_t* b, int32_t* c, int32_t m, int32_t k, int32_t n) {
#if STREAMD_AIE2
  // Vector core: rows in blocks of 4, columns in blocks of 32, depth in blocks of 32; the
  // ragged edges go through the scalar loops (integer sums: the order does not matter).
  const int32_t m4 = m / 4 * 4, n32 = n / 32 * 32, k32 = k / 32 * 32;
  if (k32 > 0) {
    for (int32_t i = 0; i < m4; i += 4)
      for (int32_t j = 0; j < n32; j += 32) gemm_4x32(a + (int64_t)i * k, b + j, c + (int64_t)i * n + j, k, n, k32);
  }
  gemm_block(a, b, c, k, n, 0, m4, 0, n32, k32, k);  // depth tail of the vector blocks
  gemm_block(a, b, c, k, n, 0, m4, n32, n, 0, k);    // right columns
  gemm_block(a, b, c, k, n, m4, m, 0, n, 0, k);      // bottom rows
#else
  gemm_block(a, b, c, k, n, 0, m, 0, n, 0, k);
#endif
}

void gemm_i16i8_i32(const int16_t* a, const int8_t* b, int32_t* c, int32_t m, int32_t k, int32_t n) {
#if STREAMD_AIE2
  // As gemm_i8_i32, with depth blocks of 16 (four 4-deep mmul steps).
  const int32_t m4 = m / 4 * 4, n32 = n / 32 * 32, k16 = k / 16 * 16;
  if (k16 > 0) {
    for (int32_t i = 0; i < m4; i += 4)
      for (int32_t j = 0; j < n32; j += 32) gemm16_4x32(a + (int64_t)i * k, b + j, c + (int64_t)i * n + j, k, n, k16);
  }
  gemm_block(a, b, c, k, n, 0, m4, 0, n32, k16, k);  // depth tail of the vector blocks
  gemm_block(a, b, c, k, n, 0, m4, n32, n, 0, k);    // right columns
  gemm_block(a, b, c, k, n, m4, m, 0, n, 0, k);      // bottom rows
#else
  gemm_block(a, b, c, k, n, 0, m, 0, n, 0, k);
#endif
}

}  // extern "C"
