// Element-wise math shared by the C++ (OpenMP) kernels and the CUDA kernels.
//
// Every function here is the per-element spec of jitkernels/backends/numpy_ref.py, written once. Compile with
// -ffp-contract=off (host) and --fmad=false (nvcc / NVRTC): a fused multiply-add rounds once where numpy rounds twice,
// and the backends must match numpy bit for bit.
#pragma once
#if !defined(__CUDACC_RTC__)
#include <stdint.h>
#include <string.h>
#endif
#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__) && (defined(__SSE__) || defined(_M_X64))
#include <xmmintrin.h>
#endif

#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
#define JK_HD __host__ __device__ __forceinline__
#else
#define JK_HD inline
#endif

namespace jk {

// bfloat16 and float16 travel as their 16 raw bits; the kernels widen them as they read.
struct bf16 { uint16_t bits; };
struct f16 { uint16_t bits; };

JK_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f; memcpy(&f, &u, 4); return f;
#endif
}

JK_HD uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u; memcpy(&u, &f, 4); return u;
#endif
}

// bf16 -> f32 is exact: the bf16 bits are the high half of the f32.
JK_HD float widen(bf16 h) { return bits_to_float((uint32_t)h.bits << 16); }

// f16 -> f32 is exact. On the GPU, the hardware conversion (exact, and immune to flush-to-zero: f16 subnormals are
// f32 normals). On the host, a branch-free decode (normal, subnormal, inf/nan) that vectorizes. A subnormal is its
// integer significand times 2^-24, both exact and normal: shifting its bits into place made an f32 subnormal, which
// a denormals-are-zero mode (torch.set_flush_denormal) read as 0.
JK_HD float widen(f16 h) {
#if defined(__CUDA_ARCH__)
  __half_raw raw;
  raw.x = h.bits;
  return __half2float(__half(raw));
#else
  const uint32_t sign = (uint32_t)(h.bits & 0x8000u) << 16;
  const uint32_t em = (uint32_t)(h.bits & 0x7fffu);
  // a normal: shift into place and rescale by 2^112 (exact: a power of two)
  const float normal = bits_to_float(em << 13) * bits_to_float(0x77800000u);
  const float mag = em < 0x400u ? (float)(int32_t)em * bits_to_float(0x33800000u) : normal;
  const uint32_t infnan = (em >= 0x7c00u) ? (0x7f800000u | (em << 13)) : 0u;
  const uint32_t out = (em >= 0x7c00u) ? infnan : float_to_bits(mag);
  return bits_to_float(sign | out);
#endif
}

JK_HD float widen(float x) { return x; }
JK_HD double widen(double x) { return x; }
JK_HD float widen(int8_t x) { return (float)x; }

// x is finite: inf - inf and nan - nan are nan, which compares unequal to 0 (no <cmath>, so NVRTC needs no headers).
JK_HD bool is_finite(double x) { return (x - x) == 0.0; }

// Round f32 to bf16, to nearest even (as ml_dtypes does); NaN stays a quiet NaN.
JK_HD bf16 narrow_bf16(float f) {
  uint32_t u = float_to_bits(f);
  bf16 r;
  if ((u & 0x7fffffffu) > 0x7f800000u) { r.bits = (uint16_t)((u >> 16) | 0x40u); return r; }
  u += 0x7fffu + ((u >> 16) & 1u);
  r.bits = (uint16_t)(u >> 16);
  return r;
}

// One step of the fold: acc + w * x, two roundings (no FMA).
template <class A>
JK_HD A fold_step(A acc, A w, A x) {
  A t = w * x;
  return acc + t;
}

// Value of element i of an update as the accumulator sees it: x = A(u) [* A(scale)] [- base].
template <class A, class In>
JK_HD A load(In u) { return (A)widen(u); }

template <class A>
JK_HD A dequant(int8_t q, float scale) { return (A)q * (A)scale; }

// Deterministic mode (pre-rounded binned sums, Demmel & Nguyen / ReproBLAS): t = w * x in f64 is split on two fixed
// grids, q1 = multiple of unit1 = ulp(s1) and q2 = multiple of ulp(s2), by adding and removing the constants
// s1 = 1.5 * 2^(b+29), s2 = 1.5 * 2^(b-4) (b = log2 of the job's bound on |t|). Both partial sums are exact, so
// the total does not depend on order; the part of t below ulp(s2) = 2^(b-56) is rounded away, deterministically.
// Ties round away from zero: setting the last mantissa bit of t (and of r = t - q1) moves a value that lies halfway
// between two grid points off the tie, and moves no other value across a rounding boundary (|t| <= 2^b, so the
// grids are more than 2^20 ulps of t apart). That rule, ReproBLAS's, lets a fast kernel add t straight into an
// accumulator biased by s1 (csrc/kernels.h fold_binned_rows): its rounding then no longer depends on the sum so far.
JK_HD double or_last_bit(double x) {
#if defined(__CUDA_ARCH__)
  return __longlong_as_double(__double_as_longlong(x) | 1LL);
#else
  uint64_t u; memcpy(&u, &x, 8); u |= 1u; memcpy(&x, &u, 8); return x;
#endif
}

JK_HD void binned_step(double& hi, double& lo, double t, double s1, double s2) {
  const double q1 = (or_last_bit(t) + s1) - s1;
  const double r = t - q1;
  const double q2 = (or_last_bit(r) + s2) - s2;
  hi = hi + q1;
  lo = lo + q2;
}

// Carry: move the multiple of unit1 held in lo into hi (exact), so lo stays within unit1/2 and can take 2^20 more
// terms before it could lose bits. One representation per sum: lo in (-unit1/2, unit1/2]. The rounding leaves a tie
// at either end (lo = +-unit1/2 stays), so the same sum was held as (hi, +h) after one batching or merge tree and
// as (hi + unit1, -h) after another: their bits differed, and DP noise, added to hi, rounded differently (a
// released model that depended on the tree).
JK_HD double binned_half(double s1) { return (s1 / 3.0) * 0x1p-52; }  // unit1 / 2 = ulp(s1) / 2, exactly

JK_HD void binned_carry(double& hi, double& lo, double s1) {
  const double c = (lo + s1) - s1;
  hi = hi + c;
  lo = lo - c;
  const double h = binned_half(s1);
  if (lo == -h) {  // (exact: hi is a multiple of unit1 far inside its range)
    hi = hi - 2 * h;
    lo = h;
  }
}

// Finalize: y = acc / A(W), then base + y when a base is given.
template <class A>
JK_HD A final_value(A acc, A total_w) { return acc / total_w; }

template <class A>
JK_HD A final_value(A acc, A total_w, A base) { A y = acc / total_w; return base + y; }

// Square root, correctly rounded (IEEE 754) on every backend: numpy, the host's sqrtss/sqrtsd, CUDA's sqrt with
// -prec-sqrt=true (NVRTC's default). No <cmath>: NVRTC compiles this header without system headers.
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
JK_HD float sqrt_rn(float x) { return sqrtf(x); }
JK_HD double sqrt_rn(double x) { return sqrt(x); }
#else
JK_HD float sqrt_rn(float x) { return __builtin_sqrtf(x); }
JK_HD double sqrt_rn(double x) { return __builtin_sqrt(x); }
#endif

// Server optimizer step, one element (jitkernels/algorithms.py states the math; numpy_ref.step is the spec).
// d = acc / W is the round's average delta, x the global model, m and v the optimizer's moments, all in A.
// Coefficients come from the host, computed in f64 and rounded to A once: b1, c1 = 1 - b1, b2, c2 = 1 - b2, the
// step size lr (bias correction included) and tau.
enum OptKind { OPT_MOMENTUM = 0, OPT_NESTEROV = 1, OPT_ADAM = 2, OPT_YOGI = 3, OPT_ADAGRAD = 4 };

template <class A>
struct OptCoef { A b1, c1, b2, c2, lr, tau; };

template <int Kind, class A>
JK_HD void opt_step(A d, A& x, A& m, A& v, const OptCoef<A>& c) {
  if (Kind == OPT_MOMENTUM || Kind == OPT_NESTEROV) {
    const A bm = c.b1 * m;
    m = bm + d;
    A s = m;
    if (Kind == OPT_NESTEROV) { const A bm2 = c.b1 * m; s = d + bm2; }
    const A step = c.lr * s;
    x = x + step;
  } else {
    const A bm = c.b1 * m, cd = c.c1 * d;
    m = bm + cd;
    const A dd = d * d;
    if (Kind == OPT_ADAM) { const A bv = c.b2 * v, cv = c.c2 * dd; v = bv + cv; }
    if (Kind == OPT_YOGI) {
      const A t = c.c2 * dd, diff = v - dd;
      const A sgn = diff > (A)0 ? (A)1 : (diff < (A)0 ? (A)-1 : (A)0);
      const A ts = t * sgn;
      v = v - ts;
    }
    if (Kind == OPT_ADAGRAD) v = v + dd;
    const A num = c.lr * m, den = sqrt_rn(v) + c.tau;
    const A step = num / den;
    x = x + step;
  }
}

// Coordinate-wise robust statistics (jitkernels/robust_coord.py is the spec; csrc/jk_robust_coord.h's tile path and
// the generated CUDA kernels of jitkernels/backends/cuda_source.py call these per coordinate).
// A comparator of a sorting network: (a, b) <- (min, max), one predicate for both, so the pair keeps its values.
JK_HD void order2(float& a, float& b) {
  const float u = a, w = b;
  const bool lt = w < u;
  a = lt ? w : u;
  b = lt ? u : w;
}
// The median from the two middle values a <= b (a == b for odd k): ((0.5*a) + (0.5*b)) + 0.0 in double. Cannot
// overflow (|result| <= max(|a|, |b|)); the halvings are exact, so this is (a+b)/2 rounded once to double, then once
// to float; + 0.0 maps -0.0 to +0.0.
JK_HD float median_mid(float a, float b) { return (float)(((0.5 * (double)a) + (0.5 * (double)b)) + 0.0); }

// Narrow a finalized value to the output dtype, rounding to nearest even as numpy / ml_dtypes do. bf16 from f64
// goes through f32 (ml_dtypes' double rounding, kept so that results match it); f16 from f64 rounds once (numpy).
JK_HD void narrow_to(float* o, float y) { *o = y; }
JK_HD void narrow_to(float* o, double y) { *o = (float)y; }
JK_HD void narrow_to(double* o, float y) { *o = (double)y; }
JK_HD void narrow_to(double* o, double y) { *o = y; }
JK_HD void narrow_to(bf16* o, float y) { *o = narrow_bf16(y); }
JK_HD void narrow_to(bf16* o, double y) { *o = narrow_bf16((float)y); }
#if defined(__CUDACC__) || defined(__CUDACC_RTC__)
// include <cuda_fp16.h> before this header in CUDA sources
JK_HD void narrow_to(f16* o, float y) { __half_raw r = __float2half_rn(y); o->bits = r.x; }
JK_HD void narrow_to(f16* o, double y) { __half_raw r = __double2half(y); o->bits = r.x; }
#else
inline void narrow_to(f16* o, float y) { _Float16 h = (_Float16)y; memcpy(&o->bits, &h, 2); }
inline void narrow_to(f16* o, double y) { _Float16 h = (_Float16)y; memcpy(&o->bits, &h, 2); }
#endif

#if !defined(__CUDACC__) && !defined(__CUDACC_RTC__)
// IEEE subnormals for a kernel's thread while it runs, its own mode put back after: flush-to-zero and
// denormals-are-zero (torch.set_flush_denormal, a library built with -Ofast) are per-thread x86 modes, so that the
// caller's thread and the OpenMP workers (which keep the mode they were started with) rounded subnormals
// differently, and results (deterministic mode's too) depended on which thread ran an item. Entered on the calling
// thread and inside each parallel region; MXCSR's FTZ (bit 15) and DAZ (bit 6) are cleared.
struct IeeeMode {
#if defined(__SSE__) || defined(_M_X64)
  unsigned saved;
  IeeeMode() : saved(_mm_getcsr()) { _mm_setcsr(saved & ~0x8040u); }
  ~IeeeMode() { _mm_setcsr(saved); }
  IeeeMode(const IeeeMode&) = delete;
  IeeeMode& operator=(const IeeeMode&) = delete;
#endif
};
#endif

}  // namespace jk
