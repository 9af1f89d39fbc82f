// CUDA kernels of the jitkernels GPU backend: thin launch code over the pointer tables of jitkernels/batch.py.
// All element-wise math is jk_math.h's, shared with the C++ backend (whose tests cover it). Compile with
// --fmad=false (nvcc) / -fmad=false (NVRTC): a contracted multiply-add would break bit-exactness with numpy.
//
// One thread block per work item (row, start, len); threads stride over the item's elements and, per element, run
// the k updates in batch order, as the reference does. Kernels are templates; the backend instantiates the ones it
// needs by name (NVRTC name expressions), and JK_INSTANTIATE_ALL instantiates every one for the nvcc check.
#include <cuda_fp16.h>

#include "../jk_math.h"

namespace jkcuda {

typedef long long i64;

template <class A, class In, bool Base, bool Quant>
__global__ void fold_rows(A* __restrict__ acc, const A* __restrict__ base, const i64* __restrict__ off,
                          const i64* __restrict__ ptr, const double* __restrict__ w, const i64* __restrict__ sptr,
                          const i64* __restrict__ blk, i64 k, const i64* __restrict__ work) {
  const i64 r = work[3 * blockIdx.x], s = work[3 * blockIdx.x + 1], len = work[3 * blockIdx.x + 2];
  A* a = acc + off[r] + s;
  const A* b = Base ? base + off[r] + s : nullptr;
  for (i64 i = threadIdx.x; i < len; i += blockDim.x) {
    A v = a[i];
    for (i64 j = 0; j < k; ++j) {
      const i64 p = ptr[r * k + j];
      if (!p) continue;
      A x;
      if (Quant) {
        const float* scales = reinterpret_cast<const float*>(sptr[r * k + j]);
        x = jk::dequant<A>(reinterpret_cast<const int8_t*>(p)[s + i], scales[(s + i) / blk[r * k + j]]);
      } else {
        x = jk::load<A>(reinterpret_cast<const In*>(p)[s + i]);
      }
      if (Base) x = x - b[i];
      v = jk::fold_step(v, (A)w[r * k + j], x);
    }
    a[i] = v;
  }
}

template <class In, bool Base, bool Quant>
__global__ void fold_binned_rows(double* __restrict__ hi, double* __restrict__ lo, const double* __restrict__ base,
                                 const i64* __restrict__ off, const i64* __restrict__ ptr,
                                 const double* __restrict__ w, const i64* __restrict__ sptr,
                                 const i64* __restrict__ blk, i64 k, const i64* __restrict__ work, double s1,
                                 double s2) {
  const i64 r = work[3 * blockIdx.x], s = work[3 * blockIdx.x + 1], len = work[3 * blockIdx.x + 2];
  double* h = hi + off[r] + s;
  double* l = lo + off[r] + s;
  const double* b = Base ? base + off[r] + s : nullptr;
  for (i64 i = threadIdx.x; i < len; i += blockDim.x) {
    double vh = h[i], vl = l[i];
    for (i64 j = 0; j < k; ++j) {
      const i64 p = ptr[r * k + j];
      if (!p) continue;
      double x;
      if (Quant) {
        const float* scales = reinterpret_cast<const float*>(sptr[r * k + j]);
        x = jk::dequant<double>(reinterpret_cast<const int8_t*>(p)[s + i], scales[(s + i) / blk[r * k + j]]);
      } else {
        x = jk::load<double>(reinterpret_cast<const In*>(p)[s + i]);
      }
      if (Base) x = x - b[i];
      jk::binned_step(vh, vl, w[r * k + j] * x, s1, s2);
    }
    jk::binned_carry(vh, vl, s1);
    h[i] = vh;
    l[i] = vl;
  }
}

template <class A, class Out, bool Base>
__global__ void finalize_rows(const A* __restrict__ acc, const A* __restrict__ base, const i64* __restrict__ off,
                              const double* __restrict__ total_w, const i64* __restrict__ optr,
                              const i64* __restrict__ work) {
  const i64 r = work[3 * blockIdx.x], s = work[3 * blockIdx.x + 1], len = work[3 * blockIdx.x + 2];
  const A* a = acc + off[r] + s;
  const A* b = Base ? base + off[r] + s : nullptr;
  Out* o = reinterpret_cast<Out*>(optr[r]) + s;
  const A W = (A)total_w[r];
  for (i64 i = threadIdx.x; i < len; i += blockDim.x) {
    const A y = Base ? jk::final_value(a[i], W, b[i]) : jk::final_value(a[i], W);
    jk::narrow_to(o + i, y);
  }
}

}  // namespace jkcuda

#ifdef JK_INSTANTIATE_ALL
#define JK_FOLD_ALL(A)                                                                  \
  template __global__ void jkcuda::fold_rows<A, double, false, false>(JK_FOLD_ARGS(A)); \
  template __global__ void jkcuda::fold_rows<A, float, false, false>(JK_FOLD_ARGS(A));  \
  template __global__ void jkcuda::fold_rows<A, jk::f16, false, false>(JK_FOLD_ARGS(A)); \
  template __global__ void jkcuda::fold_rows<A, jk::bf16, false, false>(JK_FOLD_ARGS(A)); \
  template __global__ void jkcuda::fold_rows<A, int8_t, false, true>(JK_FOLD_ARGS(A));  \
  template __global__ void jkcuda::fold_rows<A, float, true, false>(JK_FOLD_ARGS(A));   \
  template __global__ void jkcuda::fold_rows<A, jk::f16, true, false>(JK_FOLD_ARGS(A)); \
  template __global__ void jkcuda::fold_rows<A, int8_t, true, true>(JK_FOLD_ARGS(A));
#define JK_FOLD_ARGS(A)                                                                                 \
  A*, const A*, const jkcuda::i64*, const jkcuda::i64*, const double*, const jkcuda::i64*, const jkcuda::i64*, \
      jkcuda::i64, const jkcuda::i64*
JK_FOLD_ALL(float)
JK_FOLD_ALL(double)
#define JK_BINNED_ARGS                                                                                        \
  double*, double*, const double*, const jkcuda::i64*, const jkcuda::i64*, const double*, const jkcuda::i64*, \
      const jkcuda::i64*, jkcuda::i64, const jkcuda::i64*, double, double
template __global__ void jkcuda::fold_binned_rows<float, false, false>(JK_BINNED_ARGS);
template __global__ void jkcuda::fold_binned_rows<jk::bf16, true, false>(JK_BINNED_ARGS);
template __global__ void jkcuda::fold_binned_rows<int8_t, false, true>(JK_BINNED_ARGS);
#define JK_FINAL_ARGS(A) const A*, const A*, const jkcuda::i64*, const double*, const jkcuda::i64*, const jkcuda::i64*
template __global__ void jkcuda::finalize_rows<float, float, false>(JK_FINAL_ARGS(float));
template __global__ void jkcuda::finalize_rows<float, jk::f16, true>(JK_FINAL_ARGS(float));
template __global__ void jkcuda::finalize_rows<float, jk::bf16, false>(JK_FINAL_ARGS(float));
template __global__ void jkcuda::finalize_rows<double, double, true>(JK_FINAL_ARGS(double));
template __global__ void jkcuda::finalize_rows<double, jk::f16, false>(JK_FINAL_ARGS(double));
template __global__ void jkcuda::finalize_rows<double, jk::bf16, true>(JK_FINAL_ARGS(double));
#endif
