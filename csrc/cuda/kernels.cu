// CUDA kernels of the jitkernels GPU backend: thin launch code over the pointer tables of jitkernels/batch.py.
// All element-wise math is jk_math.h's, shared with the C++ backend (whose tests cover it). Compile with
// --fmad=false --ftz=false (nvcc and NVRTC): a contracted multiply-add, or a subnormal flushed to zero, would break
// bit-exactness with numpy.
//
// One thread block per work item (row, start, len), which the block finds in its work table (item_of). Each thread
// holds E elements of the item (i0 + e*blockDim.x, coalesced across the warp) and issues the loads of U updates (E
// each) before using any of them: independent loads in flight per thread are what keep HBM busy (one, waited on per
// update, reached ~1/3 of the copy bandwidth on an H100; E = 2, U = 1 reached 0.73). Every element still sees the k
// updates in batch order, as the reference does: the U loaded values are folded in j order. Kernels are templates;
// the backend compiles the ones it needs by name (NVRTC name expressions, listed in
// jitkernels/backends/cuda_source.py), and the tests instantiate the same names for nvcc and for the host emulation
// (emulate.h), which runs each grid as loops on the CPU.
#if defined(JK_HOST_EMULATION)
#include "emulate.h"
#else
#if defined(__CUDACC_RTC__)
// NVRTC has no <stdint.h>; these are the LP64 types it would give (a repeated identical typedef is legal C++)
typedef signed char int8_t;
typedef unsigned short uint16_t;
typedef unsigned int uint32_t;
#endif
#include <cuda_fp16.h>
#endif

#include "../jk_math.h"
#include "../jk_noise.h"
#include "../jk_secagg.h"

// Quads per thread (E) and updates whose loads are in flight together (U) in fold_rows; the defaults are what the
// sweep of jitkernels.gpu_benchmark --fold-variants measured best (README, "GPU").
#ifndef JK_FOLD_QUADS
#define JK_FOLD_QUADS 2
#endif
#ifndef JK_FOLD_UPDATES
#define JK_FOLD_UPDATES 4
#endif
static_assert(JK_FOLD_QUADS >= 1 && JK_FOLD_UPDATES >= 1, "fold_rows needs at least one quad and one update");

namespace jkcuda {

typedef long long i64;

struct Item {
  i64 r, s, len;  // row, first element within the row, elements
};

// Work item b of a work table: [nseg, chunk, then (row, start, len, first item) per segment]. A segment is a run of
// the row's elements [start, start + len) cut into chunk-element items; item b lies in the last segment whose first
// item is <= b (binary search: every thread of the block reads the same few words, from L1). The table grows with
// the segments, not the items: a table of one entry per item, built and uploaded on every call, cost ~1.3 ms of host
// time per fold of 250M elements (30K items), a third of the kernel's time on an H200.
__device__ __forceinline__ Item item_of(const i64* __restrict__ work, i64 b) {
  const i64* seg = work + 2;
  i64 lo = 0, hi = work[0] - 1;
  while (lo < hi) {
    const i64 mid = (lo + hi + 1) / 2;
    if (seg[4 * mid + 3] <= b) lo = mid; else hi = mid - 1;
  }
  const i64* g = seg + 4 * lo;
  const i64 s = g[1] + (b - g[3]) * work[1], end = g[1] + g[2];
  return {g[0], s, end - s < work[1] ? end - s : work[1]};
}

// Element idx of update j of row r (rj = r * k + j), as the accumulator type sees it: A(u) or A(q) * A(scale).
template <class A, class In, bool Quant>
__device__ __forceinline__ A load_x(i64 p, const i64* __restrict__ sptr, const i64* __restrict__ blk, i64 rj,
                                    i64 idx) {
  if constexpr (Quant) {
    const float* scales = reinterpret_cast<const float*>(sptr[rj]);
    return jk::dequant<A>(reinterpret_cast<const int8_t*>(p)[idx], scales[idx / blk[rj]]);
  } else {
    return jk::load<A>(reinterpret_cast<const In*>(p)[idx]);
  }
}

// Four consecutive elements, loaded or stored as one vector (16 bytes of f32, 8 of bf16/f16).
template <class T>
struct alignas(4 * sizeof(T)) Quad {
  T v[4];
};

// acc[i] = acc[i] + A(w_j) * (x_j[i] [- base[i]]), j = 0..k-1. Reads k*len*itemsize(In) + len*itemsize(A) (x2 with
// a base) and writes len*itemsize(A) bytes per work item.
//
// Where every stream of the work item (accumulator, base, each update) starts on a 4-element boundary, threads move
// quads (one vector load per stream and update: a warp reads 512 bytes of f32 or 256 of bf16 per instruction) and
// the last len % 4 elements go element by element; otherwise (a leaf at an odd offset, an int8 leaf, whose scale
// changes within a quad) the whole item goes element by element. Either way each element sees the same operations
// in the same order.
template <class A, class In, bool Base, bool Quant>
__global__ void fold_rows(A* __restrict__ acc, const A* __restrict__ base, const i64* __restrict__ off,
                          const i64* __restrict__ ptr, const double* __restrict__ w, const i64* __restrict__ sptr,
                          const i64* __restrict__ blk, i64 k, const i64* __restrict__ work) {
  const Item it = item_of(work, blockIdx.x);
  const i64 r = it.r, s = it.s, len = it.len;
  A* a = acc + off[r] + s;
  const A* b = Base ? base + off[r] + s : nullptr;
  const i64 step = blockDim.x;
  bool quads = !Quant && (off[r] + s) % 4 == 0 && reinterpret_cast<i64>(acc) % (4 * sizeof(A)) == 0 &&
               (!Base || reinterpret_cast<i64>(base) % (4 * sizeof(A)) == 0);
  for (i64 j = 0; j < k && quads; ++j) {
    const i64 p = ptr[r * k + j];
    quads = !p || (p + s * (i64)sizeof(In)) % (4 * (i64)sizeof(In)) == 0;
  }
  i64 done = 0;  // elements handled as quads
  if (quads) {
    constexpr int E = JK_FOLD_QUADS, U = JK_FOLD_UPDATES;
    const i64 nq = len / 4;
    Quad<A>* aq = reinterpret_cast<Quad<A>*>(a);
    const Quad<A>* bq = reinterpret_cast<const Quad<A>*>(b);
    for (i64 q0 = threadIdx.x; q0 < nq; q0 += step * E) {
      Quad<A> v[E], bv[E];
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const i64 q = q0 + e * step;
        if (q < nq) {
          v[e] = aq[q];
          if (Base) bv[e] = bq[q];
        }
      }
      for (i64 j0 = 0; j0 < k; j0 += U) {
        i64 p[U];
        Quad<In> x[U][E];
#pragma unroll
        for (int u = 0; u < U; ++u) {
          p[u] = j0 + u < k ? ptr[r * k + j0 + u] : 0;
          const Quad<In>* xq = reinterpret_cast<const Quad<In>*>(p[u] + s * (i64)sizeof(In));
#pragma unroll
          for (int e = 0; e < E; ++e) {
            const i64 q = q0 + e * step;
            if (p[u] && q < nq) x[u][e] = xq[q];
          }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
          if (!p[u]) continue;
          const A wj = (A)w[r * k + j0 + u];
#pragma unroll
          for (int e = 0; e < E; ++e) {
#pragma unroll
            for (int c = 0; c < 4; ++c) {
              A xv = jk::load<A>(x[u][e].v[c]);
              if (Base) xv = xv - bv[e].v[c];
              v[e].v[c] = jk::fold_step(v[e].v[c], wj, xv);
            }
          }
        }
      }
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const i64 q = q0 + e * step;
        if (q < nq) aq[q] = v[e];
      }
    }
    done = 4 * nq;
  }
  for (i64 i = done + threadIdx.x; i < len; i += step) {
    A v = a[i];
    const A bi = Base ? b[i] : A(0);
    for (i64 j = 0; j < k; ++j) {
      const i64 p = ptr[r * k + j];
      if (!p) continue;
      A x = load_x<A, In, Quant>(p, sptr, blk, r * k + j, s + i);
      if (Base) x = x - bi;
      v = jk::fold_step(v, (A)w[r * k + j], x);
    }
    a[i] = v;
  }
}

// Deterministic fold (jk::binned_step per term, jk::binned_carry at the end of the batch): reads k*len*itemsize(In)
// + 2*len*8 (+ len*8 with a base) and writes 2*len*8 bytes per work item.
template <class In, bool Base, bool Quant>
__global__ void fold_binned_rows(double* __restrict__ hi, double* __restrict__ lo, const double* __restrict__ base,
                                 const i64* __restrict__ off, const i64* __restrict__ ptr,
                                 const double* __restrict__ w, const i64* __restrict__ sptr,
                                 const i64* __restrict__ blk, i64 k, const i64* __restrict__ work, double s1,
                                 double s2) {
  constexpr int E = 4;
  const Item it = item_of(work, blockIdx.x);
  const i64 r = it.r, s = it.s, len = it.len;
  double* h = hi + off[r] + s;
  double* l = lo + off[r] + s;
  const double* b = Base ? base + off[r] + s : nullptr;
  const i64 step = blockDim.x;
  for (i64 i0 = threadIdx.x; i0 < len; i0 += step * E) {
    double vh[E], vl[E], bv[E];
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const i64 i = i0 + e * step;
      vh[e] = i < len ? h[i] : 0.0;
      vl[e] = i < len ? l[i] : 0.0;
      bv[e] = (Base && i < len) ? b[i] : 0.0;
    }
    for (i64 j = 0; j < k; ++j) {
      const i64 p = ptr[r * k + j];
      if (!p) continue;
      const double wj = w[r * k + j];
      double x[E];
#pragma unroll
      for (int e = 0; e < E; ++e) {
        const i64 i = i0 + e * step;
        x[e] = i < len ? load_x<double, In, Quant>(p, sptr, blk, r * k + j, s + i) : 0.0;
      }
#pragma unroll
      for (int e = 0; e < E; ++e) {
        if (Base) x[e] = x[e] - bv[e];
        jk::binned_step(vh[e], vl[e], wj * x[e], s1, s2);
      }
    }
#pragma unroll
    for (int e = 0; e < E; ++e) {
      const i64 i = i0 + e * step;
      if (i < len) {
        jk::binned_carry(vh[e], vl[e], s1);
        h[i] = vh[e];
        l[i] = vl[e];
      }
    }
  }
}

// out = out_t(acc / A(W)) [base + that]: reads len*itemsize(A) (x2 with a base), writes len*itemsize(Out).
template <class A, class Out, bool Base>
__global__ void finalize_rows(const A* __restrict__ acc, const A* __restrict__ base, const i64* __restrict__ off,
                              const double* __restrict__ total_w, const i64* __restrict__ optr,
                              const i64* __restrict__ work) {
  const Item it = item_of(work, blockIdx.x);
  const i64 r = it.r, s = it.s, len = it.len;
  const A* a = acc + off[r] + s;
  const A* b = Base ? base + off[r] + s : nullptr;
  Out* o = reinterpret_cast<Out*>(optr[r]) + s;
  const A W = (A)total_w[r];
  for (i64 i = threadIdx.x; i < len; i += blockDim.x) {
    const A y = Base ? jk::final_value(a[i], W, b[i]) : jk::final_value(a[i], W);
    jk::narrow_to(o + i, y);
  }
}

// Server optimizer step (jk::opt_step) over one work item, d = acc / W; x, m, v updated in place, the new x
// narrowed into out. Reads 3-4 and writes 2-3 acc-sized streams plus out. The kind is a template argument of the
// loop, picked once per block, so the loop body has no branch on it.
template <int Kind, class A, class Out>
__device__ void step_item(const A* a, A* x, A* m, A* v, Out* o, i64 len, A W, const jk::OptCoef<A>& c) {
  for (i64 i = threadIdx.x; i < len; i += blockDim.x) {
    A vi = Kind >= jk::OPT_ADAM ? v[i] : (A)0;
    A xi = x[i], mi = m[i];
    jk::opt_step<Kind>(jk::final_value(a[i], W), xi, mi, vi, c);
    x[i] = xi;
    m[i] = mi;
    if (Kind >= jk::OPT_ADAM) v[i] = vi;
    jk::narrow_to(o + i, xi);
  }
}

template <class A, class Out>
__global__ void step_rows(const A* __restrict__ acc, A* __restrict__ x, A* __restrict__ m, A* __restrict__ v,
                          const i64* __restrict__ off, const double* __restrict__ total_w,
                          const i64* __restrict__ optr, const i64* __restrict__ work, const double* __restrict__ coef,
                          int kind) {
  const Item it = item_of(work, blockIdx.x);
  const i64 r = it.r, s = it.s, len = it.len, o0 = off[r] + s;
  const jk::OptCoef<A> c{(A)coef[0], (A)coef[1], (A)coef[2], (A)coef[3], (A)coef[4], (A)coef[5]};
  const A W = (A)total_w[r];
  Out* o = reinterpret_cast<Out*>(optr[r]) + s;
  A* vs = v ? v + o0 : nullptr;
  switch (kind) {
    case jk::OPT_MOMENTUM: step_item<jk::OPT_MOMENTUM>(acc + o0, x + o0, m + o0, vs, o, len, W, c); break;
    case jk::OPT_NESTEROV: step_item<jk::OPT_NESTEROV>(acc + o0, x + o0, m + o0, vs, o, len, W, c); break;
    case jk::OPT_ADAM: step_item<jk::OPT_ADAM>(acc + o0, x + o0, m + o0, vs, o, len, W, c); break;
    case jk::OPT_YOGI: step_item<jk::OPT_YOGI>(acc + o0, x + o0, m + o0, vs, o, len, W, c); break;
    case jk::OPT_ADAGRAD: step_item<jk::OPT_ADAGRAD>(acc + o0, x + o0, m + o0, vs, o, len, W, c); break;
  }
}

// DP noise into the accumulator (jitkernels/noise.py add_noise, per leaf row r): acc[i] = acc[i] + A(sigma_r * z),
// z = jk::gaussian(seed, round, leaf_r, i): the same bits as the host, whatever the grid. Reads and writes acc once.
template <class A>
__global__ void add_noise_rows(A* __restrict__ acc, const i64* __restrict__ off, const double* __restrict__ sigma,
                               const i64* __restrict__ leaf, const i64* __restrict__ work, unsigned long long seed,
                               unsigned int round) {
  const Item it = item_of(work, blockIdx.x);
  const i64 r = it.r, s = it.s, len = it.len;
  A* a = acc + off[r] + s;
  for (i64 i = threadIdx.x; i < len; i += blockDim.x) {
    const double z = jk::gaussian(seed, round, (uint32_t)leaf[r], (jk::u64)(s + i));
    a[i] = a[i] + (A)(sigma[r] * z);
  }
}

// SecAgg modular sum (jitkernels/secagg.py modsum; the per-element math is jk_secagg.h's, shared with the C++
// backend): acc[i] <- (acc[i] +/- sum_j word(y_j[i])) mod 2^b over the k updates in table order, for the elements
// of work item t = blockIdx.x. One thread per element, the accumulator held in a register across the k updates:
// reads k*itemsize(y) + itemsize(A) bytes and writes itemsize(A) per element. bad[t*k + j] is set to 1 where update
// j holds a value outside [0, 2^b) in the item (the caller zeroes bad, and rolls the batch back with subtract = 1 if
// any is set). Integer math: the result does not depend on the grid.
template <class A>
__global__ void modsum_rows(A* __restrict__ acc, const i64* __restrict__ off, const i64* __restrict__ ptr,
                            const i64* __restrict__ code, i64 k, const i64* __restrict__ work, int bits, int subtract,
                            unsigned int* __restrict__ bad) {
  const i64 t = blockIdx.x;
  const Item it = item_of(work, t);
  const i64 r = it.r, s = it.s, len = it.len;
  A* a = acc + off[r] + s;
  const jk::u64 mask = jk::secagg_mask(bits);
  for (i64 i = threadIdx.x; i < len; i += blockDim.x) {
    A v = a[i];
    for (i64 j = 0; j < k; ++j) {
      const i64 p = ptr[r * k + j];
      if (!p) continue;
      const int c = (int)code[r * k + j];
      const int shift = jk::secagg_range_shift(c, bits);
      uint32_t y;
      jk::u64 excess;
      if (c == jk::SECAGG_64) {
        const jk::u64 w = reinterpret_cast<const jk::u64*>(p)[s + i];
        y = jk::secagg_word(w);
        excess = jk::secagg_excess(w, shift);
      } else {
        y = reinterpret_cast<const uint32_t*>(p)[s + i];
        excess = jk::secagg_excess(y, shift);
      }
      v = subtract ? jk::secagg_sub(v, y) : jk::secagg_add(v, y);
      if (excess) bad[t * k + j] = 1u;  // racing writers all store 1
    }
    a[i] = jk::secagg_reduce(v, mask);
  }
}

// Warp-level reductions (the host emulation runs one-thread warps: lane 0, identity).
#if defined(JK_HOST_EMULATION)
template <class T> T warp_sum(T v) { return v; }
inline double warp_max(double v) { return v; }
inline unsigned lane() { return 0; }
#else
template <class T>
__device__ __forceinline__ T warp_sum(T v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_down_sync(0xffffffffu, v, o);
  return v;
}
__device__ __forceinline__ double warp_max(double v) {
  for (int o = 16; o > 0; o >>= 1) { const double u = __shfl_down_sync(0xffffffffu, v, o); v = u > v ? u : v; }
  return v;
}
__device__ __forceinline__ unsigned lane() { return threadIdx.x & 31u; }
#endif

// Admission stats of device-resident updates, per (row, update): count of non-finite values of u, sum of x^2 and max
// |x| over the finite ones (inf where a finite u's delta overflows), x = f64(u) [- f64(base)] as in the reference. Each thread reduces its strided elements, each
// warp its threads, and lane 0 adds into the row's totals with atomics (outputs zeroed by the caller; max-abs as the
// bits of a non-negative double, whose integer order is its numeric order). A reduction: equal to the reference
// within a tolerance, in an order that varies between runs. Reads k*n*itemsize(in) (+ n*itemsize(A) per update
// with a base) bytes.
template <class A, class In, bool Base, bool Quant>
__global__ void stats_rows(const A* __restrict__ base, const i64* __restrict__ off, const i64* __restrict__ ptr,
                           const i64* __restrict__ sptr, const i64* __restrict__ blk, i64 k,
                           const i64* __restrict__ work, unsigned long long* __restrict__ nonfinite,
                           double* __restrict__ sumsq, unsigned long long* __restrict__ maxabs) {
  const Item it = item_of(work, blockIdx.x);
  const i64 r = it.r, s = it.s, len = it.len;
  const A* b = Base ? base + off[r] + s : nullptr;
  for (i64 j = 0; j < k; ++j) {
    const i64 p = ptr[r * k + j];
    if (!p) continue;
    unsigned long long nf = 0;
    double ss = 0.0, mx = 0.0;
    for (i64 i = threadIdx.x; i < len; i += blockDim.x) {
      const double u = load_x<double, In, Quant>(p, sptr, blk, r * k + j, s + i);
      const double x = Base ? u - (double)b[i] : u;
      if (jk::is_finite(x)) {
        ss = ss + x * x;
        const double ax = x < 0 ? -x : x;
        mx = ax > mx ? ax : mx;
      } else if (jk::is_finite(u)) {  // a finite update whose delta overflows: out of range (max inf), as on the CPU
        mx = x < 0 ? -x : x;
      } else {
        ++nf;
      }
    }
    nf = warp_sum(nf);
    ss = warp_sum(ss);
    mx = warp_max(mx);
    if (lane() == 0) {
      if (nf) atomicAdd(&nonfinite[r * k + j], nf);
      atomicAdd(&sumsq[r * k + j], ss);
      atomicMax(&maxabs[r * k + j], (unsigned long long)__double_as_longlong(mx));
    }
  }
}

// Gram matrix of a slab's rows, one pair tile per block (robust_gram.gram on the GPU). The slab is [k, n] (row i at
// x + i*ld, float or double), centered at r_c: 0 (mode 0), row refrow (mode 1) or the vector ref (mode 2). The rows
// are cut into groups of T; block b = cb*ntiles + t works on pair tile t = (I, J), I >= J (t = I(I+1)/2 + J; with
// diag_only, t = I = J and only the diagonal), over the columns c = (cb + m*ncb)*U*blockDim + u*blockDim + threadIdx
// (u < U = JK_GRAM_COLUMNS; coalesced across the warp). Each thread widens its columns' values to double, centers
// them (one rounding, as numpy's float64 tile) and adds
//   acc[p][q] += (x[I*T+p][c] - r_c) * (x[J*T+q][c] - r_c)        (the lower triangle on a diagonal tile)
//   sq[p]     += x[I*T+p][c]^2                                    (diagonal tiles: the uncentered sums of squares)
// with fma: one rounding per term, and half the instructions of a product and a sum (T^2 terms for 2T values read
// is float64 work a wide tile can be bound by). Rows past k read nothing (their terms go to accumulators the caller
// drops) and columns past n add zeros. T = 8 holds 72 float64 accumulators (~200-250 registers: one block per
// multiprocessor); T = 4 fits 128 registers, and two or more blocks share a multiprocessor. Each warp sums its
// threads' accumulators and writes them to part[(b*warps + w)*P ..], P = T^2 + T; the caller sums the parts in a
// fixed order (deterministic for a given grid).
// Reads each value of a column once per tile holding its row (ceil(k/T) tiles; the tiles of a column block run side
// by side, so the re-reads mostly hit L2) and writes only the parts: one pass, where the array path widened the slab
// to double in tiles, centered it and ran batched GEMMs (10.9 -> 2.5 ms for k = 10 x 25M float32 on an H200;
// README, "GPU").
#ifndef JK_GRAM_COLUMNS
// Columns per thread whose loads are in flight together in gram_tiles. At 1 (one column's loads, waited on per
// column, 8-16 warps per multiprocessor) the kernel measured 2.5 ms for k = 10 x 25M float32 on an H200, 0.10 of
// the copy bandwidth: latency-bound. 2 (no spills at T = 4 or 8 on sm_90) is not yet measured on a GPU: the
// benchmark's --gram-columns sweeps it.
#define JK_GRAM_COLUMNS 1
#endif
static_assert(JK_GRAM_COLUMNS >= 1, "gram_tiles needs at least one column per step");
#if defined(JK_HOST_EMULATION)
constexpr unsigned kWarp = 1;  // the emulation's warps are one thread
#else
constexpr unsigned kWarp = 32;
#endif
template <class In, class R, int T>
__global__ void __launch_bounds__(256, T <= 4 ? 2 : 1)
    gram_tiles(const In* __restrict__ x, i64 ld, i64 k, i64 n, int mode, i64 refrow, const R* __restrict__ ref,
               i64 ntiles, i64 ncb, int diag_only, double* __restrict__ part) {
  const i64 t = blockIdx.x % ntiles, cb = blockIdx.x / ntiles;
  i64 I = t, J = t;
  if (!diag_only) {
    I = 0;
    while ((I + 1) * (I + 2) / 2 <= t) ++I;
    J = t - I * (I + 1) / 2;
  }
  const i64 i0 = I * T, j0 = J * T;
  const bool diag = I == J;
  double acc[T][T], sq[T];
#pragma unroll
  for (int p = 0; p < T; ++p) {
    sq[p] = 0.0;
#pragma unroll
    for (int q = 0; q < T; ++q) acc[p][q] = 0.0;
  }
  constexpr int U = JK_GRAM_COLUMNS;
  const i64 step = blockDim.x, stride = ncb * step * U;
  for (i64 c0 = cb * step * U + threadIdx.x; c0 < n; c0 += stride) {
    // The loads of U columns are issued before any is used (see JK_GRAM_COLUMNS).
    In xa[U][T], xb[U][T];
    R xr[U];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const i64 c = c0 + u * step;
      const bool in = c < n;  // columns past n add zeros
      xr[u] = in && mode == 1 ? (R)x[refrow * ld + c] : in && mode == 2 ? ref[c] : (R)0;
#pragma unroll
      for (int p = 0; p < T; ++p) {
        xa[u][p] = in && i0 + p < k ? x[(i0 + p) * ld + c] : (In)0;
        xb[u][p] = in && !diag && j0 + p < k ? x[(j0 + p) * ld + c] : (In)0;
      }
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const double r = (double)xr[u];
      double a[T];
#pragma unroll
      for (int p = 0; p < T; ++p) {
        const double v = (double)xa[u][p];
        if (diag) sq[p] = fma(v, v, sq[p]);
        a[p] = v - r;  // rows past k: 0 - r, times a zero or never added (acc of such rows is dropped)
      }
      if (diag && diag_only) {
#pragma unroll
        for (int p = 0; p < T; ++p) acc[p][p] = fma(a[p], a[p], acc[p][p]);
      } else if (diag) {
#pragma unroll
        for (int p = 0; p < T; ++p)
#pragma unroll
          for (int q = 0; q <= p; ++q) acc[p][q] = fma(a[p], a[q], acc[p][q]);
      } else {
#pragma unroll
        for (int p = 0; p < T; ++p)
#pragma unroll
          for (int q = 0; q < T; ++q) acc[p][q] = fma(a[p], (double)xb[u][q] - r, acc[p][q]);
      }
    }
  }
  double* o = part + ((i64)blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp) * (T * T + T);
#pragma unroll
  for (int p = 0; p < T; ++p) {
#pragma unroll
    for (int q = 0; q < T; ++q) {
      const double v = warp_sum(acc[p][q]);
      if (lane() == 0) o[p * T + q] = v;
    }
    const double v = warp_sum(sq[p]);
    if (lane() == 0) o[T * T + p] = v;
  }
}

// Weighted sum of chosen rows of a slab (robust_gram.combine on the GPU: Krum's selection, the geometric median's
// and centered clipping's final sums): out[c] = In(b_c + sum_j coef[j] * (x[idx[j]][c] - b_c)) in double, the terms
// added in table order, b = base (has_base) or 0, rounded once, one thread per column. A thread's loads do not
// depend on its sum, so they are issued ahead of it (nvcc unrolls the loop by 4). Reads m*n*itemsize(In)
// (+ n*itemsize(R) with a base) and writes n*itemsize(In) bytes, where the array path widened each tile of the
// chosen rows to double before its GEMV.
template <class In, class R>
__global__ void combine_rows(const In* __restrict__ x, i64 ld, const i64* __restrict__ idx,
                             const double* __restrict__ coef, i64 m, const R* __restrict__ base, int has_base, i64 n,
                             In* __restrict__ out) {
  const i64 c = (i64)blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= n) return;
  const double b = has_base ? (double)base[c] : 0.0;
  double acc = 0.0;
  for (i64 j = 0; j < m; ++j) acc = acc + coef[j] * ((double)x[idx[j] * ld + c] - b);
  out[c] = (In)(b + acc);
}

}  // namespace jkcuda
