// Coordinate-wise robust statistics over a slab of k buffered updates: median and trimmed mean. Header-only C++
// (templates over the stored dtype), the same steps as the numba kernel of jitkernels/robust_coord.py, whose numpy
// code is the specification. Compile with -ffp-contract=off and without -ffast-math: the results must equal numpy's
// to the bit, and `x + 0.0` must stay (it maps -0.0 to +0.0).
//
// Math (per coordinate, x_(0) <= ... <= x_(k-1) the k values sorted):
//   median:        a = x_((k-1)/2), b = x_(k/2);  med = (float)(((0.5*a) + (0.5*b)) + 0.0)   in double, in this order.
//                  0.5*a + 0.5*b cannot overflow in any format (|result| <= max(|a|, |b|)); (a+b)/2 would overflow in
//                  float for a = b = 3e38, a + (b-a)/2 for b = -a = 3e38. From float inputs the halvings are exact,
//                  so this is (a+b)/2 rounded once to double, then once to float. For odd k it is a itself.
//   trimmed mean:  c = int(beta*k) (computed by the caller, Flower's rule); s = (((+0.0 + x_(c)) + x_(c+1)) + ...)
//                  + x_(k-c-1) in double, ascending rank order; tm = (float)(s / (k - 2c)).
// Only values enter either formula, and equal values have equal bits (+-0 aside, which both formulas map to +0.0),
// so no tie-breaking rule is needed, and any exact selection gives the same bits.
//
// Method: a sorting network, SIMD across coordinates (comparator (i, j) = a min to i and a max to j, lane-wise:
// branch-free, no data-dependent control flow). The network is Batcher's odd-even merge sort on k inputs, pruned to
// the comparators that reach the ranks read. Two paths, same values:
//   k <= 32 (median) / 24 (trimmed mean): the network is built at compile time (one instantiation per k) and fully
//     unrolled over k lane registers: a block of W coordinates (8 with AVX2, 4 with SSE2) is loaded from the k rows,
//     sorted in registers, and written. No buffer at all; with 16 AVX2 registers k up to ~14 runs without spills.
//   larger k: tiles of T coordinates; each row's T contiguous values are widened into a k x T buffer
//     (thread-local, ~32 KB), and the network (built at run time) runs over the buffer rows, T lanes at a time; its
//     leading disjoint comparators are applied as the rows are loaded.
// Per-coordinate quickselect (std::nth_element on the k gathered values) measured 10-15x slower than either path:
// its branches depend on the data. Bytes: k * sizeof(In) read + 4 written per coordinate; no copy of the slab.
//
// Inputs: float, jk::f16, jk::bf16 (raw 16-bit patterns, widened exactly by jk_math.h). NaN must not reach these
// kernels (jitkernels.robust_store.UpdateStore rejects non-finite updates).
//
// Inclusion. The dependencies below are included once, at global scope. The body may then be included again inside
// an ISA namespace, as csrc/kernels.cpp does with kernels.h:
//     #include "jk_robust_coord.h"                       // dependencies (and a baseline ::jkrc)
//     #pragma GCC push_options
//     #pragma GCC target("avx2,f16c")
//     #define JK_RC_AVX2 1                                // lanes of 8 floats, F16C conversions
//     namespace avx2 {
//     #undef JK_ROBUST_COORD_BODY
//     #include "jk_robust_coord.h"                       // avx2::jkrc
//     }
//     #undef JK_RC_AVX2
//     #pragma GCC pop_options
// (the body refers to ::jk:: and std:: explicitly, so it compiles inside any namespace). Without JK_RC_AVX2 the
// lanes are SSE2's 4 floats on x86-64 and scalars elsewhere.
#ifndef JK_ROBUST_COORD_DEPS
#define JK_ROBUST_COORD_DEPS
#include <stdint.h>

#include <algorithm>
#include <utility>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#include "jk_math.h"
#endif  // JK_ROBUST_COORD_DEPS

#ifndef JK_ROBUST_COORD_BODY
#define JK_ROBUST_COORD_BODY

namespace jkrc {

// Input codes, as csrc/kernels.cpp's InCode and jitkernels.robust_coord.CODES.
enum Code : int { F32 = 1, F16 = 2, BF16 = 3 };

// A comparator network: pairs (i[c], j[c]), i < j, applied in order; the first `fused` are disjoint and are applied
// while the rows are loaded.
struct Network {
  std::vector<int32_t> i, j;
  int64_t fused = 0;
};

// Batcher's odd-even merge sort on k inputs (the power-of-two network without the comparators that touch positions
// >= k: with +inf padding they would be no-ops), pruned to the comparators that can change ranks [r_lo, r_hi).
// The same list as jitkernels.robust_coord.network.
inline Network network(int64_t k, int64_t r_lo, int64_t r_hi) {
  std::vector<std::pair<int32_t, int32_t>> pairs;
  for (int64_t p = 1; p < k; p *= 2)
    for (int64_t q = p; q >= 1; q /= 2)
      for (int64_t j = q % p; j <= k - 1 - q; j += 2 * q)
        for (int64_t i = 0; i <= std::min(q - 1, k - j - q - 1); ++i)
          if ((i + j) / (2 * p) == (i + j + q) / (2 * p)) pairs.emplace_back(int32_t(i + j), int32_t(i + j + q));
  std::vector<char> need(size_t(k > 0 ? k : 1), 0);
  for (int64_t r = r_lo; r < r_hi; ++r) need[size_t(r)] = 1;
  std::vector<std::pair<int32_t, int32_t>> kept;
  for (auto it = pairs.rbegin(); it != pairs.rend(); ++it)
    if (need[size_t(it->first)] || need[size_t(it->second)]) {
      kept.push_back(*it);
      need[size_t(it->first)] = need[size_t(it->second)] = 1;
    }
  std::reverse(kept.begin(), kept.end());
  Network net;
  std::vector<char> used(size_t(k > 0 ? k : 1), 0);
  bool prefix = true;
  for (const auto& c : kept) {
    net.i.push_back(c.first);
    net.j.push_back(c.second);
    if (prefix && !used[size_t(c.first)] && !used[size_t(c.second)]) {
      used[size_t(c.first)] = used[size_t(c.second)] = 1;
      ++net.fused;
    } else {
      prefix = false;
    }
  }
  return net;
}

// Coordinates per tile: a power of two in [256, 2048], the k x T float buffer near 32 KB.
inline int64_t default_tile(int64_t k) {
  int64_t t = 1;
  const int64_t target = 32768 / (4 * std::max<int64_t>(k, 1));
  while (t * 2 <= target) t *= 2;
  return std::min<int64_t>(2048, std::max<int64_t>(256, t));
}

static inline float load(float x) { return x; }
static inline float load(::jk::bf16 h) { return ::jk::widen(h); }
static inline float load(::jk::f16 h) { return ::jk::widen(h); }

// buf[r, :len] = widen(x[r, c0:c0+len]) for every row r, with the network's fused comparators applied on the way.
template <class In>
static inline void load_tile(const In* x, int64_t ld, int64_t k, const Network& net, const char* paired, int64_t c0,
                             int64_t len, float* buf, int64_t T) {
  for (int64_t f = 0; f < net.fused; ++f) {
    const In* __restrict xa = x + int64_t(net.i[size_t(f)]) * ld + c0;
    const In* __restrict xb = x + int64_t(net.j[size_t(f)]) * ld + c0;
    float* __restrict ba = buf + int64_t(net.i[size_t(f)]) * T;
    float* __restrict bb = buf + int64_t(net.j[size_t(f)]) * T;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const float u = load(xa[t]), v = load(xb[t]);
      ba[t] = std::min(u, v);
      bb[t] = std::max(u, v);
    }
  }
  for (int64_t r = 0; r < k; ++r) {
    if (paired[r]) continue;
    const In* __restrict xr = x + r * ld + c0;
    float* __restrict br = buf + r * T;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) br[t] = load(xr[t]);
  }
}

// The network's remaining comparators over the buffer rows.
static inline void apply_network(const Network& net, float* buf, int64_t T, int64_t len) {
  const int64_t nc = int64_t(net.i.size());
  for (int64_t c = net.fused; c < nc; ++c) {
    float* __restrict a = buf + int64_t(net.i[size_t(c)]) * T;
    float* __restrict b = buf + int64_t(net.j[size_t(c)]) * T;
#pragma omp simd
    for (int64_t t = 0; t < len; ++t) {
      const float u = a[t], v = b[t];
      a[t] = std::min(u, v);  // not `v < u ? v : u`: GCC turns that store into a masked store (slow on AMD)
      b[t] = std::max(u, v);
    }
  }
}


// ---- register path (small k) ------------------------------------------------------------------------------
// Largest k on the register path, per statistic (measured on AVX2: past these the spills make the tile path as fast;
// the trimmed mean sorts fully, the median prunes). Instantiations: one per k x dtype: ~10 s of -O2 per ISA.
#ifndef JK_RC_REG_MAX_K_MEDIAN
#define JK_RC_REG_MAX_K_MEDIAN 32
#endif
#ifndef JK_RC_REG_MAX_K_TRIMMED
#define JK_RC_REG_MAX_K_TRIMMED 24
#endif
constexpr int REG_MAX_K_MEDIAN = JK_RC_REG_MAX_K_MEDIAN;
constexpr int REG_MAX_K_TRIMMED = JK_RC_REG_MAX_K_TRIMMED;

// Batcher's network for K inputs pruned to ranks [R_LO, R_HI), at compile time (the same list as network()).
template <int K, int R_LO, int R_HI>
struct StaticNet {
  struct Data {
    int n;
    int a[K * K + 1];
    int b[K * K + 1];
  };
  static constexpr Data make() {
    Data full{}, out{};
    int n = 0;
    for (int p = 1; p < K; p *= 2)
      for (int q = p; q >= 1; q /= 2)
        for (int j = q % p; j <= K - 1 - q; j += 2 * q)
          for (int i = 0; i <= (q - 1 < K - j - q - 1 ? q - 1 : K - j - q - 1); ++i)
            if ((i + j) / (2 * p) == (i + j + q) / (2 * p)) {
              full.a[n] = i + j;
              full.b[n] = i + j + q;
              ++n;
            }
    bool need[K + 1] = {};
    for (int r = R_LO; r < R_HI; ++r) need[r] = true;
    bool keep[K * K + 1] = {};
    int m = 0;
    for (int c = n - 1; c >= 0; --c)
      if (need[full.a[c]] || need[full.b[c]]) {
        keep[c] = true;
        need[full.a[c]] = need[full.b[c]] = true;
        ++m;
      }
    out.n = 0;
    for (int c = 0; c < n; ++c)
      if (keep[c]) {
        out.a[out.n] = full.a[c];
        out.b[out.n] = full.b[c];
        ++out.n;
      }
    return out;
  }
  static constexpr Data d = make();
};

// Lanes: W floats processed together. Loads widen the stored dtype exactly.
#if defined(JK_RC_AVX2)
struct Lanes {
  static constexpr int W = 8;
  typedef __m256 V;
  static inline V load(const float* p) { return _mm256_loadu_ps(p); }
  static inline V load(const ::jk::bf16* p) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  }
  static inline V load(const ::jk::f16* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static inline V vmin(V a, V b) { return _mm256_min_ps(a, b); }
  static inline V vmax(V a, V b) { return _mm256_max_ps(a, b); }
  static inline void store(float* p, V a) { _mm256_storeu_ps(p, a); }
  // W doubles
  struct D { __m256d lo, hi; };
  static inline D dzero() { return D{_mm256_setzero_pd(), _mm256_setzero_pd()}; }
  static inline D widen(V a) {
    return D{_mm256_cvtps_pd(_mm256_castps256_ps128(a)), _mm256_cvtps_pd(_mm256_extractf128_ps(a, 1))};
  }
  static inline D add(D a, D b) { return D{_mm256_add_pd(a.lo, b.lo), _mm256_add_pd(a.hi, b.hi)}; }
  static inline D mul(double c, D a) {
    const __m256d cc = _mm256_set1_pd(c);
    return D{_mm256_mul_pd(cc, a.lo), _mm256_mul_pd(cc, a.hi)};
  }
  static inline D div(D a, double c) {
    const __m256d cc = _mm256_set1_pd(c);
    return D{_mm256_div_pd(a.lo, cc), _mm256_div_pd(a.hi, cc)};
  }
  static inline void store_rounded(float* p, D a) {  // round to nearest float (the MXCSR default)
    _mm_storeu_ps(p, _mm256_cvtpd_ps(a.lo));
    _mm_storeu_ps(p + 4, _mm256_cvtpd_ps(a.hi));
  }
};
#elif defined(__SSE2__) || defined(_M_X64)
struct Lanes {
  static constexpr int W = 4;
  typedef __m128 V;
  static inline V load(const float* p) { return _mm_loadu_ps(p); }
  static inline V load(const ::jk::bf16* p) {
    const __m128i h = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(p));
    return _mm_castsi128_ps(_mm_unpacklo_epi16(_mm_setzero_si128(), h));  // bits << 16
  }
  static inline V load(const ::jk::f16* p) {
    float t[4];
    for (int i = 0; i < 4; ++i) t[i] = ::jk::widen(p[i]);
    return _mm_loadu_ps(t);
  }
  static inline V vmin(V a, V b) { return _mm_min_ps(a, b); }
  static inline V vmax(V a, V b) { return _mm_max_ps(a, b); }
  static inline void store(float* p, V a) { _mm_storeu_ps(p, a); }
  struct D { __m128d lo, hi; };
  static inline D dzero() { return D{_mm_setzero_pd(), _mm_setzero_pd()}; }
  static inline D widen(V a) { return D{_mm_cvtps_pd(a), _mm_cvtps_pd(_mm_movehl_ps(a, a))}; }
  static inline D add(D a, D b) { return D{_mm_add_pd(a.lo, b.lo), _mm_add_pd(a.hi, b.hi)}; }
  static inline D mul(double c, D a) {
    const __m128d cc = _mm_set1_pd(c);
    return D{_mm_mul_pd(cc, a.lo), _mm_mul_pd(cc, a.hi)};
  }
  static inline D div(D a, double c) {
    const __m128d cc = _mm_set1_pd(c);
    return D{_mm_div_pd(a.lo, cc), _mm_div_pd(a.hi, cc)};
  }
  static inline void store_rounded(float* p, D a) {
    _mm_storeu_ps(p, _mm_movelh_ps(_mm_cvtpd_ps(a.lo), _mm_cvtpd_ps(a.hi)));
  }
};
#else
struct Lanes {
  static constexpr int W = 1;
  typedef float V;
  template <class In>
  static inline V load(const In* p) { return jkrc::load(*p); }
  static inline V vmin(V a, V b) { return std::min(a, b); }
  static inline V vmax(V a, V b) { return std::max(a, b); }
  static inline void store(float* p, V a) { *p = a; }
  typedef double D;
  static inline D dzero() { return 0.0; }
  static inline D widen(V a) { return double(a); }
  static inline D add(D a, D b) { return a + b; }
  static inline D mul(double c, D a) { return c * a; }
  static inline D div(D a, double c) { return a / c; }
  static inline void store_rounded(float* p, D a) { *p = float(a); }
};
#endif

template <int A, int B>
static inline void reg_cx(Lanes::V* v) {
  const Lanes::V u = v[A], w = v[B];
  v[A] = Lanes::vmin(u, w);
  v[B] = Lanes::vmax(u, w);
}

template <class Net, size_t... I>
static inline void reg_apply(Lanes::V* v, std::index_sequence<I...>) {
  (void)v;  // k = 1: no comparator
  (reg_cx<Net::d.a[I], Net::d.b[I]>(v), ...);
}

// s += v[J] for the ranks J in [lo, hi), in ascending J (J is a constant, so v stays in registers).
template <int J>
static inline void reg_acc(const Lanes::V* v, int64_t lo, int64_t hi, Lanes::D& s) {
  if (lo <= J && J < hi) s = Lanes::add(s, Lanes::widen(v[J]));
}

template <size_t... J>
static inline void reg_sum(const Lanes::V* v, int64_t lo, int64_t hi, Lanes::D& s, std::index_sequence<J...>) {
  (reg_acc<int(J)>(v, lo, hi, s), ...);
}

// One block of W coordinates starting at column c: load the k rows, sort (pruned), write W results to o.
template <int K, int MODE, class In>
static inline void reg_block(const In* x, int64_t ld, int64_t c, int64_t lo, int64_t hi, double m, float* o) {
  typedef StaticNet<K, MODE == 0 ? (K - 1) / 2 : 0, MODE == 0 ? K / 2 + 1 : K> Net;
  Lanes::V v[K];
  for (int j = 0; j < K; ++j) v[j] = Lanes::load(x + j * ld + c);
  reg_apply<Net>(v, std::make_index_sequence<size_t(Net::d.n)>{});
  if (MODE == 0) {  // ((0.5*a) + (0.5*b)) + 0.0, in double
    const Lanes::D mid = Lanes::add(Lanes::mul(0.5, Lanes::widen(v[(K - 1) / 2])),
                                    Lanes::mul(0.5, Lanes::widen(v[K / 2])));
    Lanes::store_rounded(o, Lanes::add(mid, Lanes::dzero()));
  } else {  // ((+0.0 + x_(lo)) + ...) + x_(hi-1), then / m
    Lanes::D s = Lanes::dzero();
    reg_sum(v, lo, hi, s, std::make_index_sequence<size_t(K)>{});
    Lanes::store_rounded(o, Lanes::div(s, m));
  }
}

template <int K, int MODE, class In>
void reg_rows(const In* x, int64_t n, int64_t ld, int64_t lo, int64_t hi, float* out, int nthreads) {
  constexpr int W = Lanes::W;
  const double m = double(hi - lo);
  const int64_t nvec = n / W;  // whole blocks of W
  const int64_t nblocks = std::max<int64_t>(1, std::min<int64_t>(nthreads, nvec));
  const ::jk::IeeeMode ieee;  // (the tail below runs on the calling thread)
#pragma omp parallel for schedule(static, 1) num_threads(int(nblocks))
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const ::jk::IeeeMode block_ieee;
    for (int64_t b = blk * nvec / nblocks; b < (blk + 1) * nvec / nblocks; ++b)
      reg_block<K, MODE>(x, ld, b * W, lo, hi, m, out + b * W);
  }
  if (nvec * W < n) {  // the last n % W coordinates, through a padded copy (padding: the row's last value)
    const int64_t c0 = nvec * W, len = n - c0;
    In tmp[K * W];
    float o[W];
    for (int j = 0; j < K; ++j)
      for (int t = 0; t < W; ++t) tmp[j * W + t] = x[j * ld + c0 + std::min<int64_t>(t, len - 1)];
    reg_block<K, MODE>(static_cast<const In*>(tmp), W, 0, lo, hi, m, o);
    for (int64_t t = 0; t < len; ++t) out[c0 + t] = o[t];
  }
}

typedef void (*RegFn)(const void*, int64_t, int64_t, int64_t, int64_t, float*, int);

template <int K, int MODE, class In>
void reg_erased(const void* x, int64_t n, int64_t ld, int64_t lo, int64_t hi, float* out, int nthreads) {
  reg_rows<K, MODE>(static_cast<const In*>(x), n, ld, lo, hi, out, nthreads);
}

template <int MODE, class In, size_t... K>
static inline RegFn reg_pick(int64_t k, std::index_sequence<K...>) {
  static const RegFn table[] = {&reg_erased<int(K) + 1, MODE, In>...};
  return table[k - 1];
}

// ---- dispatch ------------------------------------------------------------------------------------------------------
// mode 0: median from ranks r_lo and r_hi (the two middle ranks); mode 1: trimmed mean of ranks [r_lo, r_hi).
// Tiles are split into nthreads contiguous runs, one per thread, each with its own buffer.
template <class In>
void tile_rows(const In* x, int64_t k, int64_t n, int64_t ld, int mode, int64_t r_lo, int64_t r_hi, float* out,
                 int64_t tile, int nthreads) {
  if (n <= 0 || k <= 0) return;
  const int64_t T = std::min<int64_t>(tile > 0 ? tile : default_tile(k), n);  // (a longer tile only costs memory)
  const Network net = mode == 0 ? network(k, r_lo, r_hi + 1) : network(k, r_lo, r_hi);
  std::vector<char> paired(size_t(k), 0);
  for (int64_t f = 0; f < net.fused; ++f) paired[size_t(net.i[size_t(f)])] = paired[size_t(net.j[size_t(f)])] = 1;
  const int64_t ntiles = (n + T - 1) / T;
  const int64_t nblocks = std::max<int64_t>(1, std::min<int64_t>(ntiles, nthreads));
  const double m = double(r_hi - r_lo);
  // each block's buffers, made here: std::bad_alloc inside the parallel region ended the process (std::terminate);
  // here it is the caller's MemoryError
  const std::vector<float> buf0(static_cast<size_t>(k * T));
  const std::vector<double> acc0(static_cast<size_t>(T));
  std::vector<std::vector<float>> bufs(static_cast<size_t>(nblocks), buf0);
  std::vector<std::vector<double>> accs(static_cast<size_t>(nblocks), acc0);
#pragma omp parallel for schedule(static, 1) num_threads(int(nblocks))
  for (int64_t blk = 0; blk < nblocks; ++blk) {
    const ::jk::IeeeMode ieee;
    float* buf = bufs[size_t(blk)].data();
    double* __restrict acc = accs[size_t(blk)].data();
    for (int64_t it = blk * ntiles / nblocks; it < (blk + 1) * ntiles / nblocks; ++it) {
      const int64_t c0 = it * T, len = std::min(T, n - c0);
      load_tile(x, ld, k, net, paired.data(), c0, len, buf, T);
      apply_network(net, buf, T, len);
      float* __restrict o = out + c0;
      if (mode == 0) {
        const float* __restrict ra = buf + r_lo * T;
        const float* __restrict rb = buf + r_hi * T;
#pragma omp simd
        for (int64_t t = 0; t < len; ++t)
          o[t] = ::jk::median_mid(ra[t], rb[t]);
      } else {
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) acc[t] = 0.0;
        for (int64_t r = r_lo; r < r_hi; ++r) {
          const float* __restrict row = buf + r * T;
#pragma omp simd
          for (int64_t t = 0; t < len; ++t) acc[t] = acc[t] + double(row[t]);
        }
#pragma omp simd
        for (int64_t t = 0; t < len; ++t) o[t] = float(acc[t] / m);
      }
    }
  }
}

// Coordinate-wise statistic of k rows of n values, row r at x + r*ld: out[n] (float). mode 0: the median, from ranks
// r_lo = (k-1)/2 and r_hi = k/2; mode 1: the trimmed mean of ranks [r_lo, r_hi). tile = 0: the register path for k up
// to REG_MAX_K_*, else tiles of default_tile(k); tile > 0 forces the tile path with tiles of `tile` coordinates (the
// tests compare both).
template <class In>
void select_rows(const In* x, int64_t k, int64_t n, int64_t ld, int mode, int64_t r_lo, int64_t r_hi, float* out,
                 int64_t tile, int nthreads) {
  if (n <= 0 || k <= 0) return;
  if (tile <= 0 && mode == 0 && k <= REG_MAX_K_MEDIAN) {
    reg_pick<0, In>(k, std::make_index_sequence<size_t(REG_MAX_K_MEDIAN)>{})(x, n, ld, r_lo, r_hi, out, nthreads);
  } else if (tile <= 0 && mode == 1 && k <= REG_MAX_K_TRIMMED) {
    reg_pick<1, In>(k, std::make_index_sequence<size_t(REG_MAX_K_TRIMMED)>{})(x, n, ld, r_lo, r_hi, out, nthreads);
  } else {
    tile_rows(x, k, n, ld, mode, r_lo, r_hi, out, tile, nthreads);
  }
}

// Type-erased entry point for a binding: `code` selects the stored dtype. 0 on success, -1 on a bad argument.
inline int select_code(const void* x, int code, int64_t k, int64_t n, int64_t ld, int mode, int64_t r_lo, int64_t r_hi,
                       float* out, int64_t tile, int nthreads) {
  if (k < 1 || n < 0 || ld < n || nthreads < 1 || r_lo < 0 || r_hi > k || r_lo > r_hi || (mode == 1 && r_lo == r_hi))
    return -1;
  switch (code) {
    case F32: select_rows(static_cast<const float*>(x), k, n, ld, mode, r_lo, r_hi, out, tile, nthreads); return 0;
    case F16: select_rows(static_cast<const ::jk::f16*>(x), k, n, ld, mode, r_lo, r_hi, out, tile, nthreads); return 0;
    case BF16:
      select_rows(static_cast<const ::jk::bf16*>(x), k, n, ld, mode, r_lo, r_hi, out, tile, nthreads);
      return 0;
    default: return -1;
  }
}

// Coordinate-wise median: out[n].
inline int median_code(const void* x, int code, int64_t k, int64_t n, int64_t ld, float* out, int64_t tile,
                       int nthreads) {
  return select_code(x, code, k, n, ld, 0, (k - 1) / 2, k / 2, out, tile, nthreads);
}

// Coordinate-wise trimmed mean keeping ranks [lo, hi) (lo = int(beta*k), hi = k - lo): out[n].
inline int trimmed_mean_code(const void* x, int code, int64_t k, int64_t n, int64_t ld, int64_t lo, int64_t hi,
                             float* out, int64_t tile, int nthreads) {
  return select_code(x, code, k, n, ld, 1, lo, hi, out, tile, nthreads);
}

}  // namespace jkrc

#endif  // JK_ROBUST_COORD_BODY
