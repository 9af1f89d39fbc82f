// Modular sums for secure aggregation (SecAgg, SecAgg+), shared by the C++ (OpenMP) code and CUDA (nvcc or NVRTC).
//
// Under SecAgg each party j sends y_j = (q_j + mask_j) mod 2^b, b <= 32; the masks cancel in the sum, so the server
// computes acc <- (acc + sum_j y_j) mod 2^b and never sees a q_j (Bonawitz et al., "Practical Secure Aggregation for
// Privacy-Preserving Machine Learning", CCS 2017; Bell et al., "Secure Single-Server Aggregation with (Poly)Logarithmic
// Overhead", CCS 2020, for SecAgg+). jitkernels/secagg.py holds the numpy reference (the specification) and the
// numba kernel; this header is the same per-element math and the same loop order, written once.
//
// Math. Inputs are taken mod 2^32 (their low 32-bit word: a 64-bit input contributes (uint32_t)y, as C's conversion
// to an unsigned type defines it), then the accumulator (uint32_t, wrapping mod 2^32, or unsigned 64-bit) adds them
// with wrap-around and is reduced mod 2^b once at the end. Since 2^b divides 2^32 and 2^64, every intermediate
// wrap is exact mod 2^b: the result is the same whatever the order, the thread count or the split into partial sums.
// Integer math only: no rounding, no compiler flags to worry about.
//
// Admission in the same pass: an input value v is out of range when it is not in [0, 2^b) as the integer its dtype
// holds. Reinterpreted as unsigned (two's complement), that is (v >> shift) != 0 with shift = b for unsigned inputs
// and 64-bit inputs (a negative int64 is >= 2^63 unsigned), and shift = min(b, 31) for int32 (a negative int32 is
// >= 2^31 unsigned). The loop ORs those bits per (work item, update): a caller that finds one rolls the whole batch
// back with subtract = true (exact, since subtraction inverts addition mod 2^b) and rejects the update.
//
// Bytes moved per element: k * input itemsize read (4 for 32-bit inputs, 8 for 64-bit ones), accumulator read and
// written once (2 * 4 or 2 * 8): work items are cache-sized chunks that stay in L1/L2 while the k updates stream
// through them.
#pragma once
#if defined(__CUDACC__) && !defined(__CUDACC_RTC__)
#include <cuda_fp16.h>  // jk_math.h's f16 conversions need it in CUDA sources (under NVRTC, include it first yourself)
#endif
#include "jk_math.h"

namespace jk {

// 64-bit integers as the built-in types (NVRTC has no <stdint.h>); identical to jk_noise.h's, and a repeated
// identical typedef is legal C++.
typedef unsigned long long u64;
typedef long long i64;

// Input kinds of the address table's code column (jitkernels/secagg.py's _CODE).
enum SecAggInput : int { SECAGG_U32 = 0, SECAGG_I32 = 1, SECAGG_64 = 2 };

// (1 << b) - 1 for b in [1, 32], computed in 64 bits (1u << 32 would be undefined).
JK_HD u64 secagg_mask(int bits) { return (1ull << bits) - 1ull; }

// The low 32-bit word of an input: its value mod 2^32.
JK_HD uint32_t secagg_word(uint32_t v) { return v; }
JK_HD uint32_t secagg_word(u64 v) { return (uint32_t)v; }

// One element: acc + y and acc - y with wrap-around in the accumulator's width (unsigned: defined, no promotion
// to int since unsigned int's rank is int's). A is uint32_t or u64.
template <class A>
JK_HD A secagg_add(A acc, uint32_t y) { return (A)(acc + (A)y); }
template <class A>
JK_HD A secagg_sub(A acc, uint32_t y) { return (A)(acc - (A)y); }

// Reduction mod 2^b at the end of an item (mask = secagg_mask(b)).
template <class A>
JK_HD A secagg_reduce(A acc, u64 mask) { return (A)(acc & (A)mask); }

// Shift whose nonzero result marks an out-of-range input value (see the header comment).
JK_HD int secagg_range_shift(int code, int bits) { return (code == SECAGG_I32 && bits > 31) ? 31 : bits; }

// The high bits that make v out of range (0 when it is in range). shift <= 32 and v is widened first: no UB.
JK_HD u64 secagg_excess(uint32_t v, int shift) { return (u64)v >> shift; }
JK_HD u64 secagg_excess(u64 v, int shift) { return v >> shift; }

#if !defined(__CUDACC_RTC__) && !defined(__CUDA_ARCH__)

// One update's segment into one accumulator chunk; returns the OR of the excess bits (0 when all are in range).
// shift == 64: no range check (the caller knows every value is in range).
template <class A, class W>
inline u64 secagg_segment(A* __restrict a, const W* __restrict u, i64 n, int shift, bool subtract) {
  u64 excess = 0;
  if (shift == 64) {
    if (subtract)
      for (i64 i = 0; i < n; ++i) a[i] = secagg_sub(a[i], secagg_word(u[i]));
    else
      for (i64 i = 0; i < n; ++i) a[i] = secagg_add(a[i], secagg_word(u[i]));
    return 0;
  }
  if (subtract) {
    for (i64 i = 0; i < n; ++i) {
      a[i] = secagg_sub(a[i], secagg_word(u[i]));
      excess |= secagg_excess(u[i], shift);
    }
  } else {
    for (i64 i = 0; i < n; ++i) {
      a[i] = secagg_add(a[i], secagg_word(u[i]));
      excess |= secagg_excess(u[i], shift);
    }
  }
  return excess;
}

// Four updates' segments into one accumulator chunk in one loop: the accumulator is loaded and stored once per four
// updates (as the fold's groups), each element's four adds in the same order as four secagg_segment calls. excess[i]:
// as secagg_segment's return, for update i.
template <class A, class W>
inline void secagg_segment4(A* __restrict a, const W* __restrict u0, const W* __restrict u1, const W* __restrict u2,
                            const W* __restrict u3, i64 n, int shift, bool subtract, u64* excess) {
  u64 e0 = 0, e1 = 0, e2 = 0, e3 = 0;
  if (subtract) {
    for (i64 i = 0; i < n; ++i)
      a[i] = secagg_sub(secagg_sub(secagg_sub(secagg_sub(a[i], secagg_word(u0[i])), secagg_word(u1[i])),
                                   secagg_word(u2[i])), secagg_word(u3[i]));
  } else {
    for (i64 i = 0; i < n; ++i)
      a[i] = secagg_add(secagg_add(secagg_add(secagg_add(a[i], secagg_word(u0[i])), secagg_word(u1[i])),
                                   secagg_word(u2[i])), secagg_word(u3[i]));
  }
  if (shift != 64) {  // (a second pass over the segments, from L2: rare inputs, int32 and 64-bit words or b < 32)
    for (i64 i = 0; i < n; ++i) {
      e0 |= secagg_excess(u0[i], shift);
      e1 |= secagg_excess(u1[i], shift);
      e2 |= secagg_excess(u2[i], shift);
      e3 |= secagg_excess(u3[i], shift);
    }
  }
  excess[0] = e0, excess[1] = e1, excess[2] = e2, excess[3] = e3;
}

// The host loop over an address table (jitkernels/batch.py's layout of tables):
//   acc        A[total], A = uint32_t or u64 (values mod 2^b after the call)
//   off[r]     offset of row (leaf) r in acc
//   ptr[r*k+j] address of update j's row r (element 0 of the row; 0 = absent)
//   code[r*k+j] SecAggInput of that row: 32-bit words (uint32, int32) or 64-bit (int64, uint64; little-endian)
//   work[3*t]  work item t = (row, start, len): elements [start, start + len) of the row
//   bad[t*k+j] set to 1 when update j holds an out-of-range value in item t (may be null)
// Per item: every update in table order (four at a time where four in a row are present and of one input kind: the
// accumulator chunk is then read and written once per four, each element's adds still in table order), then the
// reduction mod 2^b; items run in parallel (disjoint chunks).
// The caller releases the GIL around it.
template <class A>
void modsum_rows(A* acc, const i64* off, const i64* ptr, const i64* code, const i64* work, i64 m, i64 k, int bits,
                 bool subtract, uint8_t* bad, int nthreads) {
  const u64 mask = secagg_mask(bits);
  (void)nthreads;
#if defined(_OPENMP)
#pragma omp parallel for schedule(static) num_threads(nthreads)
#endif
  for (i64 t = 0; t < m; ++t) {
    const i64 r = work[3 * t], s = work[3 * t + 1], n = work[3 * t + 2];
    A* a = acc + off[r] + s;
    for (i64 j = 0; j < k; ++j) {
      const i64 p = ptr[r * k + j];
      if (p == 0) {
        if (bad) bad[t * k + j] = 0;
        continue;
      }
      const int c = (int)code[r * k + j];
      const int shift = secagg_range_shift(c, bits);
      if (j + 4 <= k) {  // four present updates of one input kind: one loop (N = 25M uint32, k = 10: 31 -> 26 ms)
        const i64* q = ptr + r * k + j;
        const i64* cq = code + r * k + j;
        if (q[1] && q[2] && q[3] && cq[1] == c && cq[2] == c && cq[3] == c) {
          u64 ex[4];
          if (c == SECAGG_64)
            secagg_segment4(a, reinterpret_cast<const u64*>(q[0]) + s, reinterpret_cast<const u64*>(q[1]) + s,
                            reinterpret_cast<const u64*>(q[2]) + s, reinterpret_cast<const u64*>(q[3]) + s, n, shift,
                            subtract, ex);
          else
            secagg_segment4(a, reinterpret_cast<const uint32_t*>(q[0]) + s,
                            reinterpret_cast<const uint32_t*>(q[1]) + s, reinterpret_cast<const uint32_t*>(q[2]) + s,
                            reinterpret_cast<const uint32_t*>(q[3]) + s, n, shift >= 32 ? 64 : shift, subtract, ex);
          if (bad)
            for (int g = 0; g < 4; ++g) bad[t * k + j + g] = ex[g] != 0;
          j += 3;
          continue;
        }
      }
      u64 excess;
      if (c == SECAGG_64)
        excess = secagg_segment(a, reinterpret_cast<const u64*>(p) + s, n, shift, subtract);
      else if (shift >= 32)  // every 32-bit word is in [0, 2^32): no range check, 8 lanes of 32-bit adds
        excess = secagg_segment(a, reinterpret_cast<const uint32_t*>(p) + s, n, 64, subtract);
      else
        excess = secagg_segment(a, reinterpret_cast<const uint32_t*>(p) + s, n, shift, subtract);
      if (bad) bad[t * k + j] = excess != 0;
    }
    if (mask != (u64)(A)~(A)0)
      for (i64 i = 0; i < n; ++i) a[i] = secagg_reduce(a[i], mask);
  }
}

#endif  // host only

}  // namespace jk
