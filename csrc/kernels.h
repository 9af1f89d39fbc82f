// Fold, stats and finalize over pointer tables (see jitkernels/batch.py). Included twice by kernels.cpp: once under
// an AVX2+F16C target and once for the baseline ISA, each inside its own namespace; runtime dispatch picks one.
// Element-wise math comes from jk_math.h; these loops only decide the order, which is the reference's.

template <class A, class In, bool Base>
static void fold_rows(A* acc, const A* base, const int64_t* off, const int64_t* ptr, const double* w,
                      int64_t k, const int64_t* work, int64_t m, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t it = 0; it < m; ++it) {
    const int64_t r = work[3 * it], s = work[3 * it + 1], len = work[3 * it + 2];
    A* __restrict a = acc + off[r] + s;
    const A* __restrict b = Base ? base + off[r] + s : nullptr;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t p = ptr[r * k + j];
      if (!p) continue;
      const A wj = (A)w[r * k + j];
      const In* __restrict u = reinterpret_cast<const In*>(p) + s;
      for (int64_t i = 0; i < len; ++i) {
        A x = jk::load<A>(u[i]);
        if (Base) x = x - b[i];
        a[i] = jk::fold_step(a[i], wj, x);
      }
    }
  }
}

// int8 + scales: segments of equal scale inside the chunk, so the inner loop has no division.
template <class A, bool Base>
static void fold_rows_q(A* acc, const A* base, const int64_t* off, const int64_t* ptr, const double* w,
                        const int64_t* sptr, const int64_t* blk, int64_t k, const int64_t* work, int64_t m,
                        int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t it = 0; it < m; ++it) {
    const int64_t r = work[3 * it], s = work[3 * it + 1], len = work[3 * it + 2];
    A* __restrict a = acc + off[r] + s;
    const A* __restrict b = Base ? base + off[r] + s : nullptr;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t p = ptr[r * k + j];
      if (!p) continue;
      const A wj = (A)w[r * k + j];
      const int8_t* __restrict q = reinterpret_cast<const int8_t*>(p) + s;
      const float* scales = reinterpret_cast<const float*>(sptr[r * k + j]);
      const int64_t B = blk[r * k + j];
      for (int64_t i0 = 0; i0 < len;) {
        const int64_t g = (s + i0) / B;
        const int64_t i1 = std::min(len, (g + 1) * B - s);
        const float sc = scales[g];
        for (int64_t i = i0; i < i1; ++i) {
          A x = jk::dequant<A>(q[i], sc);
          if (Base) x = x - b[i];
          a[i] = jk::fold_step(a[i], wj, x);
        }
        i0 = i1;
      }
    }
  }
}

// Stats per (work item, update): non-finite count, sum of squares, max |x|, in f64. Eight lanes make the sum
// vectorizable without -ffast-math, in an order this code fixes (so results do not depend on the thread count).
template <class A, class In, bool Base, bool Quant>
static void stats_rows(const A* base, const int64_t* off, const int64_t* ptr, const int64_t* sptr,
                       const int64_t* blk, int64_t k, const int64_t* work, int64_t m, int64_t* nonfinite,
                       double* sumsq, double* maxabs, int nthreads) {
  constexpr int L = 8;
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t it = 0; it < m; ++it) {
    const int64_t r = work[3 * it], s = work[3 * it + 1], len = work[3 * it + 2];
    const A* __restrict b = Base ? base + off[r] + s : nullptr;
    for (int64_t j = 0; j < k; ++j) {
      const int64_t p = ptr[r * k + j];
      if (!p) continue;
      const In* __restrict u = reinterpret_cast<const In*>(p) + s;
      const float* scales = Quant ? reinterpret_cast<const float*>(sptr[r * k + j]) : nullptr;
      const int64_t B = Quant ? blk[r * k + j] : 1;
      double ss[L] = {0}, mx[L] = {0}, bad[L] = {0};
      auto value = [&](int64_t i) {
        double x;
        if constexpr (Quant) x = jk::dequant<double>((int8_t)u[i], scales[(s + i) / B]);
        else x = jk::load<double>(u[i]);
        if (Base) x = x - (double)b[i];
        return x;
      };
      int64_t i = 0;
      for (; i + L <= len; i += L) {
        for (int l = 0; l < L; ++l) {
          const double x = value(i + l), ax = std::fabs(x);
          const bool fin = ax <= DBL_MAX;
          ss[l] += fin ? x * x : 0.0;
          mx[l] = (fin && ax > mx[l]) ? ax : mx[l];
          bad[l] += fin ? 0.0 : 1.0;
        }
      }
      for (; i < len; ++i) {
        const double x = value(i), ax = std::fabs(x);
        const bool fin = ax <= DBL_MAX;
        ss[0] += fin ? x * x : 0.0;
        mx[0] = (fin && ax > mx[0]) ? ax : mx[0];
        bad[0] += fin ? 0.0 : 1.0;
      }
      double tss = 0, tmx = 0, tbad = 0;
      for (int l = 0; l < L; ++l) { tss += ss[l]; tmx = mx[l] > tmx ? mx[l] : tmx; tbad += bad[l]; }
      nonfinite[it * k + j] = (int64_t)tbad;
      sumsq[it * k + j] = tss;
      maxabs[it * k + j] = tmx;
    }
  }
}

template <class A, class Out, bool Base>
static void finalize_rows(const A* acc, const A* base, const int64_t* off, const double* total_w,
                          const int64_t* optr, const int64_t* work, int64_t m, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t it = 0; it < m; ++it) {
    const int64_t r = work[3 * it], s = work[3 * it + 1], len = work[3 * it + 2];
    const A* __restrict a = acc + off[r] + s;
    const A* __restrict b = Base ? base + off[r] + s : nullptr;
    Out* __restrict o = reinterpret_cast<Out*>(optr[r]) + s;
    const A W = (A)total_w[r];
    for (int64_t i = 0; i < len; ++i) {
      const A y = Base ? jk::final_value(a[i], W, b[i]) : jk::final_value(a[i], W);
      jk::narrow_to(o + i, y);
    }
  }
}
