// pybind11 module jitkernels._core: the C++ backend. Kernels read updates in place through pointer tables built by
// jitkernels/batch.py; every entry point releases the GIL and runs on OpenMP threads (when built with OpenMP).
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <optional>
#include <stdexcept>
#include <string>
#include <type_traits>

#ifdef __linux__
#include <sys/mman.h>
#endif

#ifdef _OPENMP
#include <omp.h>
#endif

#include "jk_math.h"
#include "jk_robust_coord.h"  // baseline ::jkrc (SSE2 lanes); the AVX2 body is included below
#include "jk_secagg.h"

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#endif

#if defined(__x86_64__) || defined(_M_X64)
#define JK_X86 1
#pragma GCC push_options
#pragma GCC target("avx2,f16c")
#define JK_F16C 1
namespace avx2 {
#include "kernels.h"
}
#define JK_RC_AVX2 1
namespace avx2 {
#undef JK_ROBUST_COORD_BODY
#include "jk_robust_coord.h"
}
#undef JK_RC_AVX2
#undef JK_F16C
#pragma GCC pop_options
#endif

namespace baseline {
#include "kernels.h"
}

namespace py = pybind11;

namespace {

// Input codes, in jitkernels.batch.GROUP_ORDER.
enum InCode { F64 = 0, F32 = 1, F16 = 2, BF16 = 3, I8 = 4 };

// JITKERNELS_SIMD=baseline forces the portable path on an AVX2 host (so that its code is tested, and to rule it out
// when debugging); it is read once, when the module is imported.
bool use_avx2() {
#ifdef JK_X86
  const char* simd = std::getenv("JITKERNELS_SIMD");
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("f16c") &&
                         std::string(simd ? simd : "") != "baseline";
  return ok;
#else
  return false;
#endif
}

template <class T>
const T* data_of(const py::array& a) { return static_cast<const T*>(a.data()); }

template <class T>
T* mutable_data_of(py::array& a) { return static_cast<T*>(a.mutable_data()); }

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(what);
}

// A table argument (offsets, addresses, weights, walks): a C-contiguous numpy array of T in native byte order, taken
// as it is; anything else fails the call with pybind's TypeError. py::array_t's caster converts each argument through
// PyArray_FromAny with a fresh dtype (0.14 us each): 1.1 of a small fold call's 2 us, which a server pays per update.
// (numpy shows native order as '=' or '|'; a swapped array has T's type number too, so that alone is not enough.)
template <class T>
class Table : public py::array {
 public:
  PYBIND11_OBJECT_DEFAULT(Table, py::array, Table::is_table)
  static bool is_table(PyObject* o) {
    const auto& api = py::detail::npy_api::get();
    if (!api.PyArray_Check_(o)) return false;
    const auto* a = py::detail::array_proxy(o);
    if (!(a->flags & py::detail::npy_api::NPY_ARRAY_C_CONTIGUOUS_)) return false;
    const auto* d = py::detail::array_descriptor_proxy(a->descr);
    return (d->type_num == py::detail::npy_format_descriptor<T>::value && (d->byteorder == '=' || d->byteorder == '|'))
           || api.PyArray_EquivTypes_(a->descr, py::dtype::of<T>().ptr());
  }
  const T* data() const { return static_cast<const T*>(py::array::data()); }
};

using I64 = Table<int64_t>;
using F64A = Table<double>;

// dtype equality by equivalence, not identity: an array that crossed a process boundary (Ray, pickle) carries its
// own dtype object.
bool same_dtype(const py::dtype& a, const py::dtype& b) {
  return py::detail::npy_api::get().PyArray_EquivTypes_(a.ptr(), b.ptr());
}

// The optional base (deltas are folded against it): its data, checked to be an array of the accumulator's dtype
// (an array, so that the pointer lives as long as the caller's argument).
const void* base_data(const py::object& base_obj, const py::dtype& acc_dtype) {
  if (base_obj.is_none()) return nullptr;
  require(py::isinstance<py::array>(base_obj), "base must be a numpy array");
  auto base = py::reinterpret_borrow<py::array>(base_obj);
  require(same_dtype(base.dtype(), acc_dtype), "base must have the accumulator's dtype");
  return base.data();
}

// The three admission stats per (work item, update), zeroed.
struct StatsOut {
  py::array_t<int64_t> nonfinite;
  py::array_t<double> sumsq, maxabs;
  StatsOut(int64_t m, int64_t k) : nonfinite({m, k}), sumsq({m, k}), maxabs({m, k}) {
    std::fill_n(nonfinite.mutable_data(), m * k, 0);
    std::fill_n(sumsq.mutable_data(), m * k, 0.0);
    std::fill_n(maxabs.mutable_data(), m * k, 0.0);
  }
  py::tuple tuple() const { return py::make_tuple(nonfinite, sumsq, maxabs); }
};

// The walk of a call (jitkernels.batch.walk: the threads' shares of the tiles, the tiles' runs of work items), as
// the kernels of namespace NS take it (kernels.h is compiled once per instruction set, each with its own Walk).
void check_walk(const I64& work, const I64& share, const I64& tiles) {
  require(share.ndim() == 1 && share.size() >= 2 && tiles.ndim() == 2 && tiles.shape(1) == 2 && work.ndim() == 2 &&
              work.shape(1) == 3, "walk: work [m, 3], share [T + 1], tiles [n, 2]");
  const int64_t T = share.size() - 1, n = tiles.shape(0);
  require(share.data()[0] == 0 && share.data()[T] == n && (n == 0 || tiles.data()[2 * n - 1] <= work.shape(0)),
          "walk does not cover its tiles and work items");
}

// The GIL is let go around a kernel only when the call has work to overlap: a small call (a small model's update, in
// a server's submit) gave it up for microseconds and then queued to take it back behind whichever thread took it,
// for up to the interpreter's switch interval (5 ms).
constexpr int64_t NOGIL_MIN_ELEMENTS = int64_t(1) << 16;

struct NogilIfLarge {
  std::optional<py::gil_scoped_release> released;
  NogilIfLarge(const I64& work, int64_t k) {
    const int64_t m = work.shape(0);
    int64_t n = 0;
    for (int64_t i = 0; i < m; ++i) n += work.data()[3 * i + 2];
    if (n * std::max<int64_t>(k, 1) >= NOGIL_MIN_ELEMENTS) released.emplace();
  }
};

template <class W>
W walk_of(const I64& work, const I64& share, const I64& tiles) {
  return W{work.data(), share.data(), tiles.data(), int(share.size() - 1)};
}
#define JK_WALK(NS) walk_of<NS::Walk>(work, share, tiles)

bool is_acc_f64(const py::array& acc) {
  if (same_dtype(acc.dtype(), py::dtype::of<double>())) return true;
  if (same_dtype(acc.dtype(), py::dtype::of<float>())) return false;
  throw std::invalid_argument("accumulator must be float32 or float64");
}

// Calls f(A{}, In{}) with the accumulator and input types a call names.
template <class F>
void with_types(bool acc64, int in_code, F&& f) {
  auto in = [&](auto a) {
    switch (in_code) {
      case F64: return f(a, double{});
      case F32: return f(a, float{});
      case F16: return f(a, jk::f16{});
      case BF16: return f(a, jk::bf16{});
      case I8: return f(a, int8_t{});
    }
    throw std::invalid_argument("unknown input dtype code " + std::to_string(in_code));
  };
  if (acc64) in(double{}); else in(float{});
}

void fold(py::array acc, py::object base_obj, int in_code, I64 off, I64 ptr, F64A w, I64 sptr, I64 blk, I64 work,
          I64 share, I64 tiles) {
  check_walk(work, share, tiles);
  require(acc.flags() & py::array::c_style && acc.writeable(), "accumulator must be a writeable C-contiguous array");
  const bool acc64 = is_acc_f64(acc);
  const void* basep = base_data(base_obj, acc.dtype());
  const bool has_base = basep != nullptr;
  const int64_t k = ptr.ndim() == 2 ? ptr.shape(1) : 0;
  void* accp = acc.mutable_data();
  with_types(acc64, in_code, [&](auto a, auto in) {
    using A = decltype(a);
    using In = decltype(in);
    NogilIfLarge nogil(work, k);
    auto run = [&](auto ns_fold, auto ns_fold_q) {
      if constexpr (std::is_same_v<In, int8_t>) {
        if (has_base) ns_fold_q(std::true_type{}); else ns_fold_q(std::false_type{});
      } else {
        if (has_base) ns_fold(std::true_type{}); else ns_fold(std::false_type{});
      }
    };
#define JK_FOLD(NS)                                                                                              \
  run([&](auto b) { NS::fold_rows<A, In, decltype(b)::value>((A*)accp, (const A*)basep, off.data(), ptr.data(), \
                                                              w.data(), k, JK_WALK(NS)); },                     \
      [&](auto b) { NS::fold_rows_q<A, decltype(b)::value>((A*)accp, (const A*)basep, off.data(), ptr.data(),   \
                                                           w.data(), sptr.data(), blk.data(), k, JK_WALK(NS)); })
#ifdef JK_X86
    if (use_avx2()) { JK_FOLD(avx2); return; }
#endif
    JK_FOLD(baseline);
#undef JK_FOLD
  });
}

// fold and stats in one pass (kernels.h, fold_stats_rows): returns the stats as stats() does.
py::tuple fold_stats(py::array acc, py::object base_obj, int in_code, I64 off, I64 ptr, F64A w, I64 sptr, I64 blk,
                     I64 work, I64 share, I64 tiles, bool norms) {
  check_walk(work, share, tiles);
  require(acc.flags() & py::array::c_style && acc.writeable(), "accumulator must be a writeable C-contiguous array");
  const bool acc64 = is_acc_f64(acc);
  const void* basep = base_data(base_obj, acc.dtype());
  const bool has_base = basep != nullptr;
  const int64_t k = ptr.ndim() == 2 ? ptr.shape(1) : 0, m = work.shape(0);
  StatsOut st(m, k);
  int64_t* nf = st.nonfinite.mutable_data();
  double* ss = st.sumsq.mutable_data();
  double* mx = st.maxabs.mutable_data();
  void* accp = acc.mutable_data();
  with_types(acc64, in_code, [&](auto a, auto in) {
    using A = decltype(a);
    using In = decltype(in);
    constexpr bool Q = std::is_same_v<In, int8_t>;
    NogilIfLarge nogil(work, k);
#define JK_FOLD_STATS(NS, B, N)                                                                                 \
  NS::fold_stats_rows<A, In, B, Q, N>((A*)accp, (const A*)basep, off.data(), ptr.data(), w.data(), sptr.data(), \
                                      blk.data(), k, JK_WALK(NS), nf, ss, mx)
#define JK_FOLD_STATS_ANY(NS)                                                                                   \
  if (has_base && norms) JK_FOLD_STATS(NS, true, true);                                                          \
  else if (has_base) JK_FOLD_STATS(NS, true, false);                                                             \
  else if (norms) JK_FOLD_STATS(NS, false, true);                                                                \
  else JK_FOLD_STATS(NS, false, false)
#ifdef JK_X86
    if (use_avx2()) {
      JK_FOLD_STATS_ANY(avx2);
      return;
    }
#endif
    JK_FOLD_STATS_ANY(baseline);
#undef JK_FOLD_STATS_ANY
#undef JK_FOLD_STATS
  });
  return st.tuple();
}

void fold_binned(py::array_t<double, py::array::c_style> hi, py::array_t<double, py::array::c_style> lo,
                 py::object base_obj, int in_code, I64 off, I64 ptr, F64A w, I64 sptr, I64 blk, I64 work, I64 share,
                 I64 tiles, double s1, double s2, bool zero) {
  check_walk(work, share, tiles);
  require(hi.writeable() && lo.writeable() && hi.size() == lo.size(), "hi and lo must be writeable and equal-sized");
  const bool has_base = !base_obj.is_none();
  py::array_t<double, py::array::c_style> base;
  if (has_base) base = base_obj.cast<py::array_t<double, py::array::c_style>>();
  const int64_t k = ptr.ndim() == 2 ? ptr.shape(1) : 0;
  double* h = hi.mutable_data();
  double* l = lo.mutable_data();
  const double* bp = has_base ? base.data() : nullptr;
  with_types(true, in_code, [&](auto, auto in) {
    using In = decltype(in);
    constexpr bool Q = std::is_same_v<In, int8_t>;
    NogilIfLarge nogil(work, k);
#define JK_BINNED(NS)                                                                                          \
  if (has_base) NS::fold_binned_rows<In, true, Q>(h, l, bp, off.data(), ptr.data(), w.data(), sptr.data(),      \
                                                   blk.data(), k, JK_WALK(NS), s1, s2, zero);                   \
  else NS::fold_binned_rows<In, false, Q>(h, l, bp, off.data(), ptr.data(), w.data(), sptr.data(), blk.data(),  \
                                          k, JK_WALK(NS), s1, s2, zero)
#ifdef JK_X86
    if (use_avx2()) { JK_BINNED(avx2); return; }
#endif
    JK_BINNED(baseline);
#undef JK_BINNED
  });
}

py::tuple stats(py::object base_obj, py::dtype acc_dtype, int in_code, I64 off, I64 ptr, I64 sptr, I64 blk,
                I64 work, I64 share, I64 tiles) {
  check_walk(work, share, tiles);
  const bool acc64 = same_dtype(acc_dtype, py::dtype::of<double>());
  const void* basep = base_data(base_obj, acc_dtype);
  const bool has_base = basep != nullptr;
  const int64_t k = ptr.ndim() == 2 ? ptr.shape(1) : 0, m = work.shape(0);
  StatsOut st(m, k);
  int64_t* nf = st.nonfinite.mutable_data();
  double* ss = st.sumsq.mutable_data();
  double* mx = st.maxabs.mutable_data();
  with_types(acc64, in_code, [&](auto a, auto in) {
    using A = decltype(a);
    using In = decltype(in);
    constexpr bool Q = std::is_same_v<In, int8_t>;
    NogilIfLarge nogil(work, k);
#define JK_STATS(NS)                                                                                           \
  if (has_base) NS::stats_rows<A, In, true, Q>((const A*)basep, off.data(), ptr.data(), sptr.data(), blk.data(), \
                                               k, JK_WALK(NS), nf, ss, mx);                                     \
  else NS::stats_rows<A, In, false, Q>((const A*)basep, off.data(), ptr.data(), sptr.data(), blk.data(), k,      \
                                       JK_WALK(NS), nf, ss, mx)
#ifdef JK_X86
    if (use_avx2()) { JK_STATS(avx2); return; }
#endif
    JK_STATS(baseline);
#undef JK_STATS
  });
  return st.tuple();
}

void finalize(py::array acc, py::object base_obj, int out_code, I64 off, F64A total_w, I64 optr, I64 work,
              int nthreads) {
  const bool acc64 = is_acc_f64(acc);
  const void* basep = base_data(base_obj, acc.dtype());
  const bool has_base = basep != nullptr;
  require(out_code != I8, "int8 is not an output dtype");
  const int64_t m = work.shape(0);
  const void* accp = acc.data();
  with_types(acc64, out_code, [&](auto a, auto out) {
    using A = decltype(a);
    using Out = decltype(out);
    if constexpr (!std::is_same_v<Out, int8_t>) {
      py::gil_scoped_release nogil;
#define JK_FINAL(NS)                                                                                          \
  if (has_base) NS::finalize_rows<A, Out, true>((const A*)accp, (const A*)basep, off.data(), total_w.data(), \
                                                optr.data(), work.data(), m, nthreads);                      \
  else NS::finalize_rows<A, Out, false>((const A*)accp, (const A*)basep, off.data(), total_w.data(),          \
                                        optr.data(), work.data(), m, nthreads)
#ifdef JK_X86
      if (use_avx2()) { JK_FINAL(avx2); return; }
#endif
      JK_FINAL(baseline);
#undef JK_FINAL
    }
  });
}

// Calls f(std::integral_constant<int, Kind>) for a runtime optimizer kind: the kind is a template parameter so that
// each inner loop is branch-free and vectorizes.
template <class F>
void with_opt_kind(int kind, F&& f) {
  switch (kind) {
    case jk::OPT_MOMENTUM: return f(std::integral_constant<int, jk::OPT_MOMENTUM>{});
    case jk::OPT_NESTEROV: return f(std::integral_constant<int, jk::OPT_NESTEROV>{});
    case jk::OPT_ADAM: return f(std::integral_constant<int, jk::OPT_ADAM>{});
    case jk::OPT_YOGI: return f(std::integral_constant<int, jk::OPT_YOGI>{});
    case jk::OPT_ADAGRAD: return f(std::integral_constant<int, jk::OPT_ADAGRAD>{});
  }
  throw std::invalid_argument("unknown optimizer kind " + std::to_string(kind));
}

void step(py::array acc, py::array x, py::array m, py::object v_obj, int kind, F64A coef, int out_code, I64 off,
          F64A total_w, I64 optr, I64 work, int nthreads) {
  const bool acc64 = is_acc_f64(acc);
  const bool has_v = !v_obj.is_none();
  py::array v = has_v ? v_obj.cast<py::array>() : py::array();
  require(kind < jk::OPT_ADAM || has_v, "this optimizer needs a second moment v");
  for (const py::array* a : {&x, &m, &v}) {
    if (a == &v && !has_v) continue;
    require(same_dtype(a->dtype(), acc.dtype()) && a->size() == acc.size() && a->writeable() &&
                (a->flags() & py::array::c_style),
            "x, m and v must be writeable, C-contiguous and shaped and typed like the accumulator");
  }
  require(coef.size() == 6, "coef is (b1, c1, b2, c2, lr, tau)");
  require(out_code != I8, "int8 is not an output dtype");
  const int64_t nwork = work.shape(0);
  const double* cf = coef.data();
  const void* accp = acc.data();
  void* xp = x.mutable_data();
  void* mp = m.mutable_data();
  void* vp = has_v ? v.mutable_data() : nullptr;
  with_types(acc64, out_code, [&](auto a, auto out) {
    using A = decltype(a);
    using Out = decltype(out);
    if constexpr (!std::is_same_v<Out, int8_t>) {
      const jk::OptCoef<A> c{(A)cf[0], (A)cf[1], (A)cf[2], (A)cf[3], (A)cf[4], (A)cf[5]};
      with_opt_kind(kind, [&](auto k) {
        py::gil_scoped_release nogil;
#define JK_STEP(NS)                                                                                             \
  NS::step_rows<decltype(k)::value, A, Out>((const A*)accp, (A*)xp, (A*)mp, (A*)vp, off.data(), total_w.data(), \
                                            optr.data(), work.data(), nwork, c, nthreads)
#ifdef JK_X86
        if (use_avx2()) { JK_STEP(avx2); return; }
#endif
        JK_STEP(baseline);
#undef JK_STEP
      });
    }
  });
}

// Coordinate-wise median (mode 0) / trimmed mean of ranks [lo, hi) (mode 1) over a [k, N] slab (jk_robust_coord.h).
// rows: 2-D with unit column stride; code: 1 = f32, 2 = f16 bits, 3 = bf16 bits; tile 0 picks the path (registers for
// small k).
void robust_select(const py::array& rows, int code, int mode, int64_t lo, int64_t hi,
                   py::array_t<float, py::array::c_style>& out, int64_t tile, int nthreads) {
  require(rows.ndim() == 2, "rows must be [k, N]");
  const int64_t item = code == 1 ? 4 : 2;
  // (the column stride of a slab of 0 or 1 columns is arbitrary)
  require(rows.itemsize() == item && (rows.size() <= rows.shape(0) || rows.strides(1) == item) &&
              rows.strides(0) % item == 0,
          "rows: unit column stride and an itemsize matching the code");
  require(out.ndim() == 1 && out.shape(0) == rows.shape(1) && out.writeable(), "out must be a writeable float32[N]");
  const int64_t k = rows.shape(0), n = rows.shape(1), ld = rows.strides(0) / item;
  if (mode == 0) lo = (k - 1) / 2, hi = k / 2;
  int rc;
  {
    py::gil_scoped_release nogil;
#ifdef JK_X86
    if (use_avx2())
      rc = avx2::jkrc::select_code(rows.data(), code, k, n, ld, mode, lo, hi, out.mutable_data(), tile, nthreads);
    else
#endif
      rc = jkrc::select_code(rows.data(), code, k, n, ld, mode, lo, hi, out.mutable_data(), tile, nthreads);
  }
  if (rc != 0) throw std::invalid_argument("robust kernel: invalid arguments (code " + std::to_string(rc) + ")");
}

void robust_median(py::array rows, int code, py::array_t<float, py::array::c_style> out, int64_t tile, int nthreads) {
  robust_select(rows, code, 0, 0, 0, out, tile, nthreads);
}

void robust_trimmed_mean(py::array rows, int code, int64_t lo, int64_t hi, py::array_t<float, py::array::c_style> out,
                         int64_t tile, int nthreads) {
  robust_select(rows, code, 1, lo, hi, out, tile, nthreads);
}

// SecAgg k-way modular sum (jk_secagg.h, modsum_rows): integer adds vectorize with the baseline ISA, and the loop is
// memory-bound, so there is no AVX2 variant. Returns bad[m, k]: update j holds a value outside [0, 2^bits) in item m.
py::array_t<uint8_t> modsum(py::array acc, I64 off, I64 ptr, I64 code, I64 work, int bits, bool subtract,
                            int nthreads) {
  require(acc.flags() & py::array::c_style && acc.writeable(), "accumulator must be a writeable C-contiguous array");
  require(bits >= 1 && bits <= 32, "modulus_bits must be in [1, 32]");
  const bool wide = same_dtype(acc.dtype(), py::dtype::of<uint64_t>());
  require(wide || same_dtype(acc.dtype(), py::dtype::of<uint32_t>()), "accumulator must be uint32 or uint64");
  const int64_t m = work.shape(0), k = ptr.ndim() == 2 ? ptr.shape(1) : 0;
  py::array_t<uint8_t> bad({m, k});
  // jk::i64 is long long (NVRTC has no <stdint.h>); int64_t is long here: same width, another type
  auto t = [](const I64& a) { return reinterpret_cast<const jk::i64*>(a.data()); };
  {
    py::gil_scoped_release nogil;
    if (wide)
      jk::modsum_rows<jk::u64>(static_cast<jk::u64*>(acc.mutable_data()), t(off), t(ptr), t(code), t(work), m, k,
                               bits, subtract, bad.mutable_data(), nthreads);
    else
      jk::modsum_rows<uint32_t>(static_cast<uint32_t*>(acc.mutable_data()), t(off), t(ptr), t(code), t(work), m, k,
                                bits, subtract, bad.mutable_data(), nthreads);
  }
  return bad;
}

// STREAM-like read probe: sums a buffer on nthreads threads; time it to measure read bandwidth.
double probe_read(py::array_t<float, py::array::c_style> buf, int nthreads) {
  py::gil_scoped_release nogil;
#ifdef JK_X86
  if (use_avx2()) return avx2::probe_sum(buf.data(), buf.size(), nthreads);
#endif
  return baseline::probe_sum(buf.data(), buf.size(), nthreads);
}

// (non-finite values, max |x| of the finite ones) of a C-contiguous float32 or float64 array, on nthreads threads.
py::tuple finite_maxabs(py::array a, int nthreads) {
  require(bool(a.flags() & py::array::c_style), "finite_maxabs takes a C-contiguous array");
  const bool f64 = same_dtype(a.dtype(), py::dtype::of<double>());
  require(f64 || same_dtype(a.dtype(), py::dtype::of<float>()), "finite_maxabs takes float32 or float64");
  const int64_t n = a.size();
  int64_t bad = 0;
  double mx = 0;
  {
    std::optional<py::gil_scoped_release> nogil;
    if (n >= NOGIL_MIN_ELEMENTS) nogil.emplace();
    auto run = [&](auto* x) {
#ifdef JK_X86
      if (use_avx2()) return avx2::finite_maxabs(x, n, nthreads, bad, mx);
#endif
      baseline::finite_maxabs(x, n, nthreads, bad, mx);
    };
    if (f64) run(static_cast<const double*>(a.data())); else run(static_cast<const float*>(a.data()));
  }
  return py::make_tuple(bad, mx);
}

// A new bytes object of n uninitialized bytes and the address of its data: the caller fills it (numpy views over that
// address) before sharing it, as C extensions fill PyBytes_FromStringAndSize(NULL, n). Lets a finalize write straight
// into the bytes that a framework's messages carry (Flower's Parameters.tensors must be bytes), without a copy.
// ``huge``: from 4 MB, ask for transparent huge pages over the data's whole pages, as numpy does for its own arrays
// (numpy._core.multiarray._get_madvise_hugepage): a fresh 100 MB bytes object took 40 ms to fill on 4 KB pages (a
// fault each) against 6 ms for a numpy array of the same size, most of a Flower round's finalize.
py::tuple new_bytes(py::ssize_t n, bool huge) {
  require(n >= 0, "n must be >= 0");
  PyObject* b = PyBytes_FromStringAndSize(nullptr, n);
  if (b == nullptr) throw py::error_already_set();
  const auto addr = reinterpret_cast<std::uintptr_t>(PyBytes_AS_STRING(b));
#if defined(__linux__) && defined(MADV_HUGEPAGE)
  constexpr std::uintptr_t kPage = 4096;
  if (huge && n >= (py::ssize_t{1} << 22)) {
    const std::uintptr_t lo = (addr + kPage - 1) & ~(kPage - 1), hi = (addr + n) & ~(kPage - 1);
    madvise(reinterpret_cast<void*>(lo), hi - lo, MADV_HUGEPAGE);  // advice only: a kernel without THP says EINVAL
  }
#endif
  return py::make_tuple(py::reinterpret_steal<py::bytes>(b), addr);
}

// Data addresses of a list of numpy arrays (0 for an empty one), or -1 for an item that is not one: a leaf table's
// address column in one call (numpy's __array_interface__ builds a dict per leaf, ~1.7 us each).
py::array_t<int64_t> leaf_addresses(py::list items) {
  py::array_t<int64_t> out(static_cast<py::ssize_t>(items.size()));
  auto* o = out.mutable_data();
  py::ssize_t i = 0;
  for (auto item : items) {
    if (py::isinstance<py::array>(item)) {
      auto a = py::reinterpret_borrow<py::array>(item);
      o[i] = a.size() ? reinterpret_cast<int64_t>(a.data()) : 0;
    } else {
      o[i] = -1;
    }
    ++i;
  }
  return out;
}

int max_threads() {
#ifdef _OPENMP
  return omp_get_max_threads();
#else
  return 1;
#endif
}

}  // namespace

namespace pybind11::detail {
template <class T>
struct handle_type_name<Table<T>> {
  static constexpr auto name =
      const_name("numpy.ndarray[") + npy_format_descriptor<T>::name + const_name(", C-contiguous]");
};
}  // namespace pybind11::detail

PYBIND11_MODULE(_core, mod) {
  mod.doc() = "jitkernels C++ backend: fused fold, stats, finalize and server-optimizer step over pointer tables "
              "(OpenMP, GIL released)";
  mod.def("fold", &fold, py::arg("acc"), py::arg("base"), py::arg("in_code"), py::arg("off"), py::arg("ptr"),
          py::arg("w"), py::arg("scale_ptr"), py::arg("block"), py::arg("work"), py::arg("share"), py::arg("tiles"));
  // (written in place: a converted copy would take the writes and drop them)
  mod.def("fold_binned", &fold_binned, py::arg("hi").noconvert(), py::arg("lo").noconvert(), py::arg("base"),
          py::arg("in_code"), py::arg("off"), py::arg("ptr"), py::arg("w"), py::arg("scale_ptr"), py::arg("block"),
          py::arg("work"), py::arg("share"), py::arg("tiles"), py::arg("s1"), py::arg("s2"),
          py::arg("zero") = false);
  mod.def("fold_stats", &fold_stats, py::arg("acc"), py::arg("base"), py::arg("in_code"), py::arg("off"),
          py::arg("ptr"), py::arg("w"), py::arg("scale_ptr"), py::arg("block"), py::arg("work"), py::arg("share"),
          py::arg("tiles"), py::arg("norms") = true);
  mod.def("stats", &stats, py::arg("base"), py::arg("acc_dtype"), py::arg("in_code"), py::arg("off"),
          py::arg("ptr"), py::arg("scale_ptr"), py::arg("block"), py::arg("work"), py::arg("share"),
          py::arg("tiles"));
  mod.def("finalize", &finalize, py::arg("acc"), py::arg("base"), py::arg("out_code"), py::arg("off"),
          py::arg("total_w"), py::arg("out_ptr"), py::arg("work"), py::arg("nthreads"));
  mod.def("step", &step, py::arg("acc"), py::arg("x"), py::arg("m"), py::arg("v"), py::arg("kind"),
          py::arg("coef"), py::arg("out_code"), py::arg("off"), py::arg("total_w"), py::arg("out_ptr"),
          py::arg("work"), py::arg("nthreads"));
  mod.def("robust_median", &robust_median, py::arg("rows"), py::arg("code"), py::arg("out").noconvert(),
          py::arg("tile"), py::arg("nthreads"));
  mod.def("robust_trimmed_mean", &robust_trimmed_mean, py::arg("rows"), py::arg("code"), py::arg("lo"),
          py::arg("hi"), py::arg("out").noconvert(), py::arg("tile"), py::arg("nthreads"));
  mod.def("modsum", &modsum, py::arg("acc"), py::arg("off"), py::arg("ptr"), py::arg("code"), py::arg("work"),
          py::arg("bits"), py::arg("subtract"), py::arg("nthreads"));
  mod.def("new_bytes", &new_bytes, py::arg("n"), py::arg("huge") = false);
  mod.def("max_threads", &max_threads);
  mod.def("leaf_addresses", &leaf_addresses, py::arg("items"));
  mod.def("finite_maxabs", &finite_maxabs, py::arg("a"), py::arg("nthreads"),
          "(non-finite values, max |x| of the finite ones) of a C-contiguous float32/float64 array.");
  mod.def("probe_read", &probe_read, py::arg("buf").noconvert(), py::arg("nthreads"),
          "Sum of a float32 buffer on nthreads threads: time it to measure read bandwidth.");
  mod.attr("openmp") =
#ifdef _OPENMP
      true;
#else
      false;
#endif
  mod.attr("simd") = use_avx2() ? "avx2+f16c" : "baseline";
}
