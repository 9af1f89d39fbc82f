// Counter-based Gaussian noise for differential privacy, bit-identical on every backend.
//
// Element i of leaf `leaf` in round `round` of a job with 64-bit `seed` gets the normal z(seed, round, leaf, i)
// defined below. jitkernels/noise.py holds the numpy reference (the specification) and the numba kernel; this header
// is the same function for the C++ (host) and CUDA (device, nvcc or NVRTC) code, written once.
//
//   block   c = i >> 1 (elements 2c and 2c+1 share one Philox block)
//   Philox  (w0, w1, w2, w3) = philox4x32_10(counter = (c_lo32, c_hi32, leaf, round), key = (seed_lo32, seed_hi32))
//   u1      = (((w0 << 21) | (w1 >> 11)) + 1) * 2^-53      in (0, 1], exact in float64
//   u2      =  ((w2 << 21) | (w3 >> 11))      * 2^-53      in [0, 1), exact in float64
//   rho     = sqrt(-2 * jk_log(u1))                           (IEEE sqrt: correctly rounded everywhere)
//   z(2c)   = rho * cos(2 pi u2),  z(2c+1) = rho * sin(2 pi u2) (Box-Muller, 1958)
//
// Why our own log and sin/cos: libm, CUDA's libdevice, LLVM (numba) and numpy each round log/sin/cos differently in
// the last bit. jk_log and jk_sincos_2pi use only +, -, *, / (each correctly rounded by IEEE 754) and exact bit
// manipulation, in one fixed order, so every compiler that keeps the order and does not fuse multiply-adds gets the
// same bits. Compile with -ffp-contract=off (host) and --fmad=false (nvcc / NVRTC); never with fast-math.
#pragma once
#if defined(__CUDACC__) && !defined(__CUDACC_RTC__)
#include <cuda_fp16.h>  // jk_math.h's f16 conversions need it in CUDA sources (under NVRTC, include it first yourself)
#endif
#include "jk_math.h"
#if !defined(__CUDACC_RTC__)
#include <math.h>  // sqrt on the host path; the device path uses __dsqrt_rn
#endif

namespace jk {

// 64-bit integers as the built-in types: NVRTC has no <stdint.h> (kernels.cu typedefs only the narrow types before
// including jk_math.h, as a source that includes this header under NVRTC must too).
typedef unsigned long long u64;
typedef long long i64;

// ---------------------------------------------------------------------------------------------------------------
// Philox4x32-10 (Salmon, Moraes, Dror, Shaw, "Parallel random numbers: as easy as 1, 2, 3", SC'11), as Random123's
// philox4x32_R(10, ctr, key): 10 rounds, the key bumped by the Weyl constants between rounds.

struct u32x4 { uint32_t v[4]; };

constexpr uint32_t PHILOX_M0 = 0xD2511F53u;
constexpr uint32_t PHILOX_M1 = 0xCD9E8D57u;
constexpr uint32_t PHILOX_W0 = 0x9E3779B9u;  // golden ratio
constexpr uint32_t PHILOX_W1 = 0xBB67AE85u;  // sqrt(3) - 1

// hi and lo words of the 64-bit product a * b (exact; nvcc emits one mul.wide.u32).
JK_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const u64 p = (u64)a * (u64)b;
  *hi = (uint32_t)(p >> 32);
  *lo = (uint32_t)p;
}

JK_HD u32x4 philox4x32_10(u32x4 ctr, uint32_t k0, uint32_t k1) {
  for (int r = 0; r < 10; ++r) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(PHILOX_M0, ctr.v[0], &hi0, &lo0);
    mulhilo32(PHILOX_M1, ctr.v[2], &hi1, &lo1);
    u32x4 out = {{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
    ctr = out;
    k0 += PHILOX_W0;  // wraps mod 2^32 (unsigned)
    k1 += PHILOX_W1;
  }
  return ctr;
}

// ---------------------------------------------------------------------------------------------------------------
// Uniforms: 53 bits from two words (hi's 32 bits, then lo's top 21). Every step is exact: the integer is at most
// 2^53 (so converts to double exactly) and the scale is a power of two.

JK_HD u64 bits53(uint32_t hi, uint32_t lo) { return ((u64)hi << 21) | (u64)(lo >> 11); }

// u in (0, 1]: never 0, so log(u) is finite; the smallest value is 2^-53 (|z| <= sqrt(106 ln 2) ~ 8.57).
JK_HD double uniform_oc(uint32_t hi, uint32_t lo) { return (double)(bits53(hi, lo) + 1u) * 0x1p-53; }

// u in [0, 1).
JK_HD double uniform_co(uint32_t hi, uint32_t lo) { return (double)bits53(hi, lo) * 0x1p-53; }

JK_HD u64 f64_bits(double x) {
#if defined(__CUDA_ARCH__)
  return (u64)__double_as_longlong(x);
#else
  u64 u; memcpy(&u, &x, 8); return u;
#endif
}

JK_HD double f64_from_bits(u64 u) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double((long long)u);
#else
  double x; memcpy(&x, &u, 8); return x;
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// jk_log(x) = ln x for positive normal finite x (no subnormal, zero, inf or NaN handling: gaussian() only passes
// u1 in [2^-53, 1]). fdlibm's e_log.c method, branch-free:
//   x = 2^k (1 + f), sqrt(2)/2 <= 1 + f < sqrt(2)   (k and 1 + f by bit manipulation: exact)
//   s = f / (2 + f);  ln(1 + f) = 2s + s R(s^2), R a degree-7 minimax polynomial (error < 2^-58.45)
//   ln x = k ln2_hi - ((hfsq - (s (hfsq + R) + k ln2_lo)) - f),  hfsq = f^2 / 2
// fdlibm also has special cases for |f| < 2^-20 and for small f; they are faster but not more accurate than the
// form above, and with k = 0 the form reduces to fdlibm's k == 0 expression exactly (0 - (a - f) == f - a).
// ln2_hi has 11 trailing zero bits, so k * ln2_hi is exact. Error < 1 ulp (fdlibm's analysis; measured in the tests).

JK_HD double jk_log(double x) {
  const double ln2_hi = 0x1.62e42fee00000p-1, ln2_lo = 0x1.a39ef35793c76p-33;
  const double Lg1 = 0x1.5555555555593p-1, Lg2 = 0x1.999999997fa04p-2, Lg3 = 0x1.2492494229359p-2,
               Lg4 = 0x1.c71c51d8e78afp-3, Lg5 = 0x1.7466496cb03dep-3, Lg6 = 0x1.39a09d078c69fp-3,
               Lg7 = 0x1.2f112df3e5244p-3;
  const u64 bits = f64_bits(x);
  i64 hx = (i64)(bits >> 32);
  i64 k = (hx >> 20) - 1023;
  hx &= 0x000fffff;
  const i64 i = (hx + 0x95f64) & 0x100000;  // 0x100000 when the mantissa is >= sqrt(2): use x/2, k + 1
  const double m = f64_from_bits(((u64)(hx | (i ^ 0x3ff00000)) << 32) | (bits & 0xffffffffu));
  k += i >> 20;
  const double f = m - 1.0;
  const double s = f / (2.0 + f);
  const double dk = (double)k;
  const double z = s * s;
  const double w = z * z;
  const double t1 = w * (Lg2 + w * (Lg4 + w * Lg6));
  const double t2 = z * (Lg1 + w * (Lg3 + w * (Lg5 + w * Lg7)));
  const double R = t2 + t1;
  const double hfsq = 0.5 * f * f;
  return dk * ln2_hi - ((hfsq - (s * (hfsq + R) + dk * ln2_lo)) - f);
}

// ---------------------------------------------------------------------------------------------------------------
// sin and cos of x + y on [-pi/4, pi/4], y the tail of x (FreeBSD msun k_sin.c / k_cos.c, same constants, same
// evaluation order; error < 1 ulp there).

JK_HD double kernel_sin(double x, double y) {
  const double S1 = -0x1.5555555555549p-3, S2 = 0x1.111111110f8a6p-7, S3 = -0x1.a01a019c161d5p-13,
               S4 = 0x1.71de357b1fe7dp-19, S5 = -0x1.ae5e68a2b9cebp-26, S6 = 0x1.5d93a5acfd57cp-33;
  const double z = x * x;
  const double w = z * z;
  const double r = (S2 + z * (S3 + z * S4)) + z * w * (S5 + z * S6);
  const double v = z * x;
  return x - ((z * (0.5 * y - v * r) - y) - v * S1);
}

JK_HD double kernel_cos(double x, double y) {
  const double C1 = 0x1.555555555554cp-5, C2 = -0x1.6c16c16c15177p-10, C3 = 0x1.a01a019cb1590p-16,
               C4 = -0x1.27e4f809c52adp-22, C5 = 0x1.1ee9ebdb4b1c4p-29, C6 = -0x1.8fae9be8838d4p-37;
  const double z = x * x;
  const double w = z * z;
  const double r = z * (C1 + z * (C2 + z * C3)) + w * w * (C4 + z * (C5 + z * C6));
  const double hz = 0.5 * z;
  const double v = 1.0 - hz;
  return v + (((1.0 - v) - hz) + (z * r - x * y));
}

// sin(2 pi u) and cos(2 pi u), u in turns, |u| < 2^48.
//  1. Range reduction, exact because it is in turns: t = 4u (quarter turns), q = t rounded to an integer (adding and
//     removing 1.5 * 2^52 rounds to nearest even), r = t - q in [-1/2, 1/2] (Sterbenz: exact).
//  2. theta = r * pi/2 in [-pi/4, pi/4] as a double-double (p, y): p = fl(r * PIO2_HI), and its rounding error e
//     exactly by Dekker's product on Veltkamp halves (no FMA needed), plus r * PIO2_LO for the rest of pi/2.
//  3. The kernels give sin/cos(theta); quadrant q mod 4 swaps and negates them (exact).
JK_HD void jk_sincos_2pi(double u, double* sin_out, double* cos_out) {
  const double PIO2_HI = 0x1.921fb54442d18p0;     // pi/2 rounded to double
  const double PIO2_LO = 0x1.1a62633145c07p-54;   // pi/2 - PIO2_HI
  const double PIO2_HH = 0x1.921fb58000000p0;     // Veltkamp halves of PIO2_HI (26 significant bits or fewer)
  const double PIO2_HL = -0x1.dde9740000000p-27;
  const double t = 4.0 * u;
  const double q = (t + 0x1.8p52) - 0x1.8p52;
  const double r = t - q;
  const double p = r * PIO2_HI;
  const double c = 134217729.0 * r;  // 2^27 + 1: splits r into rh + rl, each with 26 significant bits or fewer
  const double rh = c - (c - r);
  const double rl = r - rh;
  const double e = (((rh * PIO2_HH - p) + rh * PIO2_HL) + rl * PIO2_HH) + rl * PIO2_HL;  // p + e == r * PIO2_HI
  const double y = e + r * PIO2_LO;
  const double s = kernel_sin(p, y);
  const double co = kernel_cos(p, y);
  const i64 n = (i64)q & 3;
  double sn = (n & 1) ? co : s;
  double cs = (n & 1) ? s : co;
  // angle = (n + r) quarter turns: n = 0: (S, C); 1: (C, -S); 2: (-S, -C); 3: (-C, S) for (sin, cos)
  if (n & 2) sn = -sn;
  if ((n + 1) & 2) cs = -cs;
  *sin_out = sn;
  *cos_out = cs;
}

JK_HD double ieee_sqrt(double x) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(x);
#else
  return sqrt(x);
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// The two normals of block c: *z0 for element 2c (cosine branch), *z1 for element 2c + 1 (sine branch).
JK_HD void gaussian_pair(u64 seed, uint32_t round, uint32_t leaf, u64 c, double* z0, double* z1) {
  u32x4 ctr = {{(uint32_t)c, (uint32_t)(c >> 32), leaf, round}};
  const u32x4 w = philox4x32_10(ctr, (uint32_t)seed, (uint32_t)(seed >> 32));
  const double u1 = uniform_oc(w.v[0], w.v[1]);
  const double u2 = uniform_co(w.v[2], w.v[3]);
  const double rho = ieee_sqrt(-2.0 * jk_log(u1));
  double s, co;
  jk_sincos_2pi(u2, &s, &co);
  *z0 = rho * co;
  *z1 = rho * s;
}

// z(seed, round, leaf, i): the standard normal for element i. Noise for a value is then sigma * z in float64.
JK_HD double gaussian(u64 seed, uint32_t round, uint32_t leaf, u64 i) {
  double z0, z1;
  gaussian_pair(seed, round, leaf, i >> 1, &z0, &z1);
  return (i & 1u) ? z1 : z0;
}

}  // namespace jk
