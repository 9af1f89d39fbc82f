// Fold, stats and finalize over pointer tables (see jitkernels/batch.py). Included twice by kernels.cpp: once under
// an AVX2+F16C target and once for the baseline ISA, each inside its own namespace; runtime dispatch picks one.
// Element-wise math comes from jk_math.h; these loops only decide the order, which is the reference's.

// f16 inputs are widened in blocks through a small f32 buffer: F16C converts 8 at a time, which the compiler
// cannot do on its own (it has no vector type for _Float16 without AVX512-FP16).
constexpr int64_t WIDEN_BLOCK = 1024;

static inline void widen_block(const jk::f16* u, float* t, int64_t n) {
  int64_t i = 0;
#ifdef JK_F16C
  for (; i + 8 <= n; i += 8)
    _mm256_storeu_ps(t + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u + i))));
#endif
  for (; i < n; ++i) t[i] = jk::widen(u[i]);
}

// Calls seg(ptr, i0, n) over [0, len) with ptr reading In directly, or f32 widened from f16 block by block.
template <class In, class Seg>
static inline void for_segments(const In* u, int64_t len, Seg&& seg) {
  if constexpr (std::is_same_v<In, jk::f16>) {
    float tmp[WIDEN_BLOCK];
    for (int64_t i0 = 0; i0 < len; i0 += WIDEN_BLOCK) {
      const int64_t n = std::min(WIDEN_BLOCK, len - i0);
      widen_block(u + i0, tmp, n);
      seg(static_cast<const float*>(tmp), i0, n);
    }
  } else {
    seg(u, int64_t(0), len);
  }
}

// Block length of a one-item tile (see for_blocks).
constexpr int64_t SUB = 256;

#ifdef JK_F16C
// f16 -> f32 fold with F16C: the vector form of jk::load + jk::fold_step (a multiply, then an add: two roundings,
// as the scalar spec). The compiler cannot vectorize _Float16 widening by itself before AVX512-FP16.
template <bool Base>
static inline void fold_f16_f32(float* __restrict a, const jk::f16* __restrict u, const float* __restrict b, float w,
                                int64_t n) {
  const __m256 vw = _mm256_set1_ps(w);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 x = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u + i)));
    if (Base) x = _mm256_sub_ps(x, _mm256_loadu_ps(b + i));
    _mm256_storeu_ps(a + i, _mm256_add_ps(_mm256_loadu_ps(a + i), _mm256_mul_ps(vw, x)));
  }
  for (; i < n; ++i) {
    float x = jk::load<float>(u[i]);
    if (Base) x = x - b[i];
    a[i] = jk::fold_step(a[i], w, x);
  }
}
#endif

#ifdef JK_F16C
// int8 -> f32 terms of fold_block_g, 8 elements at a time: jk::dequant (exact int -> float, then one multiply by the
// scale) [- b], times w, added: the scalar spec's roundings in its order. GCC vectorizes the scalar loop 32 elements
// wide (the int8 loads), widening through words with extracts and spilling registers across the four streams; loading
// 8 bytes straight into vpmovsxbd took the grouped pass from 10.9 to 8.7 ms per 25M x 10 with the data in cache
// (2 threads, a C++ model of fold_rows_q; the one-update loop: 9.2-9.8 ms, so grouping alone did not pay: int8's
// fold is bound by its convert-multiply-multiply-add work, not by the accumulator's traffic). Returns the elements
// done; the caller's scalar loop does the rest.
template <bool Base, int G>
static inline int64_t fold_q8_f32(float* __restrict a, const float* __restrict b, const int8_t* const* u,
                                  const float* w, const float* s, int64_t n) {
  __m256 vw[G], vs[G];
  for (int j = 0; j < G; ++j) {
    vw[j] = _mm256_set1_ps(w[j]);
    vs[j] = _mm256_set1_ps(s[j]);
  }
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    __m256 x = _mm256_loadu_ps(a + i);
    for (int j = 0; j < G; ++j) {
      const __m128i q = _mm_loadl_epi64(reinterpret_cast<const __m128i*>(u[j] + i));
      __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), vs[j]);
      if (Base) v = _mm256_sub_ps(v, _mm256_loadu_ps(b + i));
      x = _mm256_add_ps(x, _mm256_mul_ps(vw[j], v));
    }
    _mm256_storeu_ps(a + i, x);
  }
  return i;
}
#endif

// Calls seg(i0, i1, g) over [0, n) cut where the scale block g = (start + i) / B changes: one division per block.
template <class Seg>
static inline void for_scale_segments(int64_t start, int64_t n, int64_t B, Seg&& seg) {
  for (int64_t i0 = 0; i0 < n;) {
    const int64_t g = (start + i0) / B;
    const int64_t i1 = std::min(n, (g + 1) * B - start);
    seg(i0, i1, g);
    i0 = i1;
  }
}

// The work items of a call and the order in which threads visit them, as jitkernels.batch.walk computes it (one
// rule, also handed to numba): thread t walks the tiles share[t]:share[t+1], tile i being the items
// tiles[2i]:tiles[2i+1]. With few updates a tile is one item, cut into SUB-blocks, and every update is folded into a
// block before the next: the block's accumulator stays in L1 while the k streams run on block after block. With many
// (batch.MANY_UPDATES), the hardware prefetchers lose track of k streams that each read one short run and wait for
// the other k - 1, so a tile holds the items of about TILE elements of the thread's share (256 KiB of f32
// accumulator, in L2) and is walked update-major: update j's runs through the whole tile before update j + 1's (the
// plain fold takes FOLD_GROUP updates through the tile side by side, see fold_rows). (The loop shape follows the
// tile, not k: a one-item tile at the end of a share of many updates is SUB-blocked, at most one per share; same
// bits either way.)
// Wherever an update's leaves lie next to each other in memory (split from one buffer: safetensors, Flower's bytes,
// a flat vector), update j is then one long sequential read (k = 100 x 100k elements: 1.71 -> 1.35 ms, two threads,
// in a C++ model of the loop). Per element the updates still come in batch order, so either way the result is the
// reference's to the bit.
struct Walk {
  const int64_t* work;   // [m, 3]: row, start, len
  const int64_t* share;  // [nthreads + 1]
  const int64_t* tiles;  // [ntiles, 2]
  int nthreads;
};

static inline int thread_index() {
#ifdef _OPENMP
  return omp_get_thread_num();
#else
  return 0;
#endif
}

static inline int thread_count() {
#ifdef _OPENMP
  return omp_get_num_threads();
#else
  return 1;
#endif
}

constexpr auto no_done = [](int64_t, int64_t) {};

// The one loop nest of every fold: for each block (a SUB-block of a one-item tile, or a whole item of a longer
// tile), the updates in batch order, G at a time: visit(it, j0, j1, b0, n) for updates j0 <= j < j1 (present or not)
// over elements b0 .. b0 + n of work item it, in one or more pieces; done(o, n) follows once every update has passed
// the block. ``min_sub`` raises the piece length for bodies with a fixed cost per call (fold_stats_rows). A team
// smaller than asked for still covers every share.
template <class Visit, class Done>
static void walk_blocks(const int64_t* off, int64_t k, int64_t G, const Walk& wk, Visit&& visit, Done&& done,
                        int64_t min_sub) {
  const int64_t* work = wk.work;
  // one update: no other stream shares the block, so a longer one only saves calls
  const int64_t sub = k == 1 ? std::max(min_sub, 32 * SUB) : std::max(min_sub, SUB);
  // a tile's bodies see pieces of an update's run, one after another (the same memory order): a body that reads its
  // piece twice (fold_stats) finds it in L1
  const int64_t piece = std::max(min_sub, 8 * SUB);
#pragma omp parallel num_threads(wk.nthreads) if (wk.nthreads > 1)
  for (int64_t t = thread_index(); t < wk.nthreads; t += thread_count()) {
    const jk::IeeeMode ieee;  // (per share: one per thread, unless the team came up smaller than asked)
    for (int64_t ti = wk.share[t]; ti < wk.share[t + 1]; ++ti) {
      const int64_t t0 = wk.tiles[2 * ti], t1 = wk.tiles[2 * ti + 1];
      if (t1 - t0 == 1) {
        const int64_t r = work[3 * t0], s = work[3 * t0 + 1], len = work[3 * t0 + 2];
        for (int64_t b0 = 0; b0 < len; b0 += sub) {
          const int64_t n = std::min(sub, len - b0);
          for (int64_t j0 = 0; j0 < k; j0 += G) visit(t0, j0, std::min(k, j0 + G), b0, n);
          done(off[r] + s + b0, n);
        }
        continue;
      }
      for (int64_t j0 = 0; j0 < k; j0 += G)
        for (int64_t it = t0; it < t1; ++it)
          for (int64_t b0 = 0, len = work[3 * it + 2]; b0 < len; b0 += piece)
            visit(it, j0, std::min(k, j0 + G), b0, std::min(piece, len - b0));
      for (int64_t it = t0; it < t1; ++it) done(off[work[3 * it]] + work[3 * it + 1], work[3 * it + 2]);
    }
  }
}

// walk_blocks one update at a time: every update present calls body(it, e, p, pos, o, n) (it: the work item, e: the
// update's table entry, p: its address, pos: the piece's position in the leaf, o: in the accumulator, n: its length).
template <class Body, class Done>
static void for_blocks(const int64_t* off, const int64_t* ptr, int64_t k, const Walk& wk, Body&& body, Done&& done,
                       int64_t min_sub = SUB) {
  const int64_t* work = wk.work;
  walk_blocks(off, k, 1, wk, [&](int64_t it, int64_t j, int64_t, int64_t b0, int64_t n) {
    const int64_t r = work[3 * it], s = work[3 * it + 1];
    const int64_t p = ptr[r * k + j];
    if (p) body(it, r * k + j, p, s + b0, off[r] + s + b0, n);
  }, done, min_sub);
}

// Prefetch the cache lines that start in [p + from, p + to) bytes (past the end of a row it is harmless: a prefetch
// never faults). Called once per register block of the deterministic fold with the block's window some elements
// ahead, so that each line of each stream is asked for once, a steady distance before its use.
static inline void prefetch_lines(const void* p, int64_t from, int64_t to) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  for (uintptr_t line = (a + from + 63) & ~uintptr_t(63); line < a + to; line += 64)
    __builtin_prefetch(reinterpret_cast<const void*>(line));
}

// One block of one update into the accumulator: a[i] = a[i] + w * x, x = A(u[i]) [- b[i]].
template <class A, class In, bool Base>
static inline void fold_block(A* __restrict a, const A* __restrict b, const In* u, A wj, int64_t n) {
#ifdef JK_F16C
  if constexpr (std::is_same_v<In, jk::f16> && std::is_same_v<A, float>) {
    fold_f16_f32<Base>(a, u, b, wj, n);
    return;
  }
#endif
  for_segments(u, n, [&](auto v, int64_t i0, int64_t len) {
    A* __restrict ai = a + i0;
    for (int64_t i = 0; i < len; ++i) {
      A x = jk::load<A>(v[i]);
      if (Base) x = x - b[i0 + i];
      ai[i] = jk::fold_step(ai[i], wj, x);
    }
  });
}

// int8 + scales: within a block, segments of equal scale, so that the inner loop has no division.
template <class A, bool Base>
static inline void fold_block_q(A* __restrict a, const A* __restrict b, const int8_t* __restrict q,
                                const float* scales, int64_t pos, int64_t B, A wj, int64_t n) {
  for_scale_segments(pos, n, B, [&](int64_t i0, int64_t i1, int64_t g) {
    const float sc = scales[g];
    for (int64_t i = i0; i < i1; ++i) {
      A x = jk::dequant<A>(q[i], sc);
      if (Base) x = x - b[i];
      a[i] = jk::fold_step(a[i], wj, x);
    }
  });
}

// FOLD_GROUP updates of a row in one pass over a block: x = a[i], then x = fold_step(x, w_j, x_j) for each update
// in batch order, then a[i] = x: the operations of FOLD_GROUP fold_block calls in their order (the same bits), with
// the accumulator loaded and stored once per group, not per update, and the group's update streams read side by
// side. Measured on 2 vCPUs, interleaved with the previous one-update-at-a-time loop (bench/results/
// fold_group_ab_epyc.txt): 25M float32 x 10 in 50 leaves 40.6-42.4 -> 33.2-36.4 ms (0.80 -> 1.0 of the read
// roofline), 100k bfloat16 x 100 1.7-1.9 -> 1.1-1.5 ms; 100k float32 x 100 within noise (2.0 -> 1.7-2.1 ms: there
// one core's read of 4 KB pages bounds it). f16 (F16C widening) keeps the one-update loop. int8 (In = int8_t) groups
// too, over one scale segment at a time (see fold_group): x_j = jk::dequant(q_j[i], s[j]), s the group's scales there.
constexpr int64_t FOLD_GROUP = 4;

template <class In>
constexpr bool groups_fold = std::is_same_v<In, float> || std::is_same_v<In, double> || std::is_same_v<In, jk::bf16>;

template <class A, class In, bool Base, int G>
static inline void fold_block_g(A* __restrict a, const A* __restrict b, const In* const* u, const A* w,
                                const float* s, int64_t n) {
  constexpr bool Quant = std::is_same_v<In, int8_t>;
  const In* __restrict u0 = u[0];
  const In* __restrict u1 = u[G > 1 ? 1 : 0];
  const In* __restrict u2 = u[G > 2 ? 2 : 0];
  const In* __restrict u3 = u[G > 3 ? 3 : 0];
  const A w0 = w[0], w1 = w[G > 1 ? 1 : 0], w2 = w[G > 2 ? 2 : 0], w3 = w[G > 3 ? 3 : 0];
  // (scales in registers, not read through s per element: s is not restrict, so the stores to a could alias it)
  const float s0 = Quant ? s[0] : 0.f, s1 = Quant ? s[G > 1 ? 1 : 0] : 0.f, s2 = Quant ? s[G > 2 ? 2 : 0] : 0.f,
              s3 = Quant ? s[G > 3 ? 3 : 0] : 0.f;
  auto term = [&](const In* __restrict v, float sc, int64_t i) {
    A x;
    if constexpr (Quant) x = jk::dequant<A>(v[i], sc); else x = jk::load<A>(v[i]);
    if (Base) x = x - b[i];
    return x;
  };
  int64_t i = 0;
#ifdef JK_F16C
  if constexpr (Quant && std::is_same_v<A, float>) i = fold_q8_f32<Base, G>(a, b, u, w, s, n);
#endif
  for (; i < n; ++i) {
    A x = jk::fold_step(a[i], w0, term(u0, s0, i));
    if constexpr (G > 1) x = jk::fold_step(x, w1, term(u1, s1, i));
    if constexpr (G > 2) x = jk::fold_step(x, w2, term(u2, s2, i));
    if constexpr (G > 3) x = jk::fold_step(x, w3, term(u3, s3, i));
    a[i] = x;
  }
}

// The present updates among j0 <= j < j1 of row r (at most FOLD_GROUP): their table entries, in batch order.
static inline int present_updates(const int64_t* ptr, int64_t r, int64_t k, int64_t j0, int64_t j1, int64_t* es) {
  int g = 0;
  for (int64_t j = j0; j < j1; ++j)
    if (ptr[r * k + j]) es[g++] = r * k + j;
  return g;
}

// fold_block_g of the g updates es[0..g) over elements pos .. pos + n of their leaf (o in the accumulator). int8
// (In = int8_t): sptr, the updates' scale addresses, and B, the block size all g share: the updates of a row share
// pos, so their scale blocks then change at the same elements, and each segment between is one fold_block_g.
template <class A, class In, bool Base>
static inline void fold_group(A* acc, const A* base, const int64_t* ptr, const double* w, const int64_t* es, int g,
                              int64_t pos, int64_t o, int64_t n, const int64_t* sptr = nullptr, int64_t B = 0) {
  auto seg = [&](int64_t i0, int64_t i1, int64_t blk_index) {
    const In* u[FOLD_GROUP];
    A wg[FOLD_GROUP];
    float s[FOLD_GROUP];
    for (int q = 0; q < g; ++q) {
      u[q] = reinterpret_cast<const In*>(ptr[es[q]]) + pos + i0;
      wg[q] = (A)w[es[q]];
      if constexpr (std::is_same_v<In, int8_t>) s[q] = reinterpret_cast<const float*>(sptr[es[q]])[blk_index];
    }
    A* a = acc + o + i0;
    const A* b = Base ? base + o + i0 : nullptr;
    switch (g) {
      case 1: fold_block_g<A, In, Base, 1>(a, b, u, wg, s, i1 - i0); break;
      case 2: fold_block_g<A, In, Base, 2>(a, b, u, wg, s, i1 - i0); break;
      case 3: fold_block_g<A, In, Base, 3>(a, b, u, wg, s, i1 - i0); break;
      case 4: fold_block_g<A, In, Base, 4>(a, b, u, wg, s, i1 - i0); break;
      default: break;
    }
  };
  if constexpr (std::is_same_v<In, int8_t>) for_scale_segments(pos, n, B, seg); else seg(0, n, 0);
}

template <class A, class In, bool Base>
static void fold_rows(A* acc, const A* base, const int64_t* off, const int64_t* ptr, const double* w,
                      int64_t k, const Walk& wk) {
  if constexpr (groups_fold<In>) {
    const int64_t* work = wk.work;
    walk_blocks(off, k, FOLD_GROUP, wk, [&](int64_t it, int64_t j0, int64_t j1, int64_t b0, int64_t n) {
      const int64_t r = work[3 * it], pos = work[3 * it + 1] + b0;
      int64_t es[FOLD_GROUP];
      const int g = present_updates(ptr, r, k, j0, j1, es);
      fold_group<A, In, Base>(acc, base, ptr, w, es, g, pos, off[r] + pos, n);
    }, no_done, SUB);
  } else {
    for_blocks(off, ptr, k, wk, [&](int64_t, int64_t e, int64_t p, int64_t pos, int64_t o, int64_t n) {
      fold_block<A, In, Base>(acc + o, Base ? base + o : nullptr, reinterpret_cast<const In*>(p) + pos, (A)w[e], n);
    }, no_done);
  }
}

// int8 in groups as fold_rows: each run of consecutive present updates with one block size (all of them, when the
// parties quantized alike) is one fold_group; a group of mixed block sizes falls back to runs down to one update,
// whose scale segments differ. Runs in batch order keep each element's updates in batch order: the same bits.
// Interleaved with the one-update loop on 2 vCPUs (bench/results/int8_group_ab_epyc.txt): 25M x 10 in 50 leaves
// 12.1-13.9 -> 10.0-10.9 ms (float32's fold_many 26.5-28 ms in both: 2.16-2.24x -> 2.58-2.70x its rate), 100k x 100
// 0.53-0.57 -> 0.41-0.44 ms.
template <class A, bool Base>
static void fold_rows_q(A* acc, const A* base, const int64_t* off, const int64_t* ptr, const double* w,
                        const int64_t* sptr, const int64_t* blk, int64_t k, const Walk& wk) {
  const int64_t* work = wk.work;
  walk_blocks(off, k, FOLD_GROUP, wk, [&](int64_t it, int64_t j0, int64_t j1, int64_t b0, int64_t n) {
    const int64_t r = work[3 * it], pos = work[3 * it + 1] + b0;
    int64_t es[FOLD_GROUP];
    const int g = present_updates(ptr, r, k, j0, j1, es);
    for (int q0 = 0, q1; q0 < g; q0 = q1) {
      for (q1 = q0 + 1; q1 < g && blk[es[q1]] == blk[es[q0]];) ++q1;
      fold_group<A, int8_t, Base>(acc, base, ptr, w, es + q0, q1 - q0, pos, off[r] + pos, n, sptr, blk[es[q0]]);
    }
  }, no_done, SUB);
}

// Deterministic fold: jk::binned_step per term, in batch order, then a carry per element once the batch is in.
// Reads k*len*itemsize(In) bytes of updates and reads and writes hi and lo (32 bytes per element); with ``zero``
// (the caller's state is empty) hi and lo are taken as 0 and not read, 16 bytes per element: the first group starts
// its registers at 0 (the same bits as adding to +0 or -0: bh - s1 is never -0). A round's first fold_many is such a
// batch; skipping the loads took it from 79 to 68-71 ms at 25M x 10 on 2 vCPUs, 151 to 133-141 ms on one
// (bench/results/deterministic_zero_ab_epyc.txt; the stores still read their lines for ownership), before the
// steady prefetch below; with it, 0-4 ms of 35-66 ms.
// The pass is bound by its float64 arithmetic, not by memory, on 2 vCPUs; so BIN_V elements of hi and lo stay in
// vector registers while up to BIN_GROUP updates pass (no round trip through L1 per term), the terms are added in
// the biased form below, and the batch's last group carries before it stores. Every sum is exact and each term's
// q1, q2 depend on it alone, so the bits are the reference's.
typedef double bin_d4 __attribute__((vector_size(32)));  // GCC vector extensions: AVX2 here, SSE2 pairs in baseline
typedef float bin_f4 __attribute__((vector_size(16)));
typedef int64_t bin_i4 __attribute__((vector_size(32)));
constexpr bin_i4 bin_one = {1, 1, 1, 1};  // jk::or_last_bit
constexpr int BIN_VECS = 4;
constexpr int64_t BIN_V = 4 * BIN_VECS;  // elements per register block
constexpr int64_t BIN_GROUP = 16;        // updates per register pass: BIN_GROUP read streams, as batch.MANY_UPDATES
// Elements ahead at which each register block prefetches its streams' lines. The hardware prefetchers alone, or a
// burst of 16 KB per update every 4096 elements (as before), left the pass 1.6x slower when the updates lay at like
// offsets in huge pages (numpy's arrays past 4 MB, flat buffers split into leaves): 41-67 ms by where they were
// placed, 27-29 ms with this steady per-line distance (25M x 10, 2 threads, a C++ model of this loop; 2048 bytes
// ahead already lost ground, 4096 lost it all). Set in elements: each block takes the same number from every stream.
constexpr int64_t BIN_AHEAD = 256;

// Four f32 to f64 (exact). GCC lowers __builtin_convertvector(f4 -> d4) to two 128-bit conversions and an insert
// even under AVX2, which cost the deterministic pass a sixth of its time (72 -> 60 ms at 25M x 10).
static inline void widen4(bin_f4 f, bin_d4& x) {
#ifdef JK_F16C
  x = (bin_d4)_mm256_cvtps_pd((__m128)f);
#else
  x = __builtin_convertvector(f, bin_d4);
#endif
}

// One update's part of a work item: element i of the item is x = A(u[pos + i]) [* scale].
template <class In, bool Quant>
struct BinSrc {
  const In* u;  // at the item's first element
  double w;
  const float* scales;
  int64_t pos, block;
  double at(int64_t i) const {
    if constexpr (Quant) return jk::dequant<double>(u[i], scales[(pos + i) / block]);
    else return jk::load<double>(u[i]);
  }
  void four(int64_t i, bin_d4& x) const {  // elements i..i+3 (out parameter: a vector return would warn of the ABI)
    if constexpr (std::is_same_v<In, float>) {
      bin_f4 v;
      memcpy(&v, u + i, sizeof v);
      widen4(v, x);
    } else if constexpr (std::is_same_v<In, double>) {
      memcpy(&x, u + i, sizeof x);
    } else if constexpr (std::is_same_v<In, jk::bf16>) {  // jk::widen: the bits are the high half of an f32
      typedef uint16_t h4 __attribute__((vector_size(8)));
      typedef uint32_t w4 __attribute__((vector_size(16)));
      h4 v;
      memcpy(&v, u + i, sizeof v);
      const w4 bits = __builtin_convertvector(v, w4) << 16;
      bin_f4 f;
      memcpy(&f, &bits, sizeof f);
      widen4(f, x);
#ifdef JK_F16C
    } else if constexpr (std::is_same_v<In, jk::f16>) {  // exact, as jk::widen
      widen4((bin_f4)_mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(u + i))), x);
#endif
    } else if constexpr (Quant) {  // one scale for the four unless a scale block ends among them
      const int64_t g = (pos + i) / block;
      if ((g + 1) * block - pos >= i + 4) {
        const double sc = scales[g];
        for (int e = 0; e < 4; ++e) x[e] = (double)u[i + e] * sc;
      } else {
        for (int e = 0; e < 4; ++e) x[e] = at(i + e);
      }
    } else {
      for (int e = 0; e < 4; ++e) x[e] = at(i + e);
    }
  }
};

template <class In, bool Base, bool Quant>
static void fold_binned_rows(double* hi, double* lo, const double* base, const int64_t* off, const int64_t* ptr,
                             const double* w, const int64_t* sptr, const int64_t* blk, int64_t k,
                             const Walk& wk, double s1, double s2, bool zero) {
  using Src = BinSrc<In, Quant>;
  const int64_t* work = wk.work;
  const bin_d4 vs1 = {s1, s1, s1, s1}, vs2 = {s2, s2, s2, s2};
  const double half = jk::binned_half(s1);
  const bin_d4 vhalf = {half, half, half, half}, vunit = vhalf + vhalf;
  const int64_t isz = Quant ? 1 : int64_t(sizeof(In));
  auto item = [&](int64_t it) {
    const int64_t r = work[3 * it], s = work[3 * it + 1], len = work[3 * it + 2];
    const int64_t o = off[r] + s;
    double* __restrict h = hi + o;
    double* __restrict l = lo + o;
    const double* __restrict b = Base ? base + o : nullptr;
    Src src[BIN_GROUP];
    int64_t j0 = 0;
    bool last = false, load = !zero;  // (only the first group may skip the loads: the later ones add to its sums)
    for (; !last; load = true) {
      int64_t g = 0;  // the next group: up to BIN_GROUP present updates, in batch order
      for (; j0 < k && g < BIN_GROUP; ++j0) {
        const int64_t e = r * k + j0;
        if (!ptr[e]) continue;
        src[g++] = Src{reinterpret_cast<const In*>(ptr[e]) + s, w[e],
                       Quant ? reinterpret_cast<const float*>(sptr[e]) : nullptr, s, Quant ? blk[e] : 1};
      }
      last = j0 == k;  // the batch's last group carries before it stores (the carry of every term in)
      int64_t i = 0;
      for (; i + BIN_V <= len; i += BIN_V) {
        for (int64_t q = 0; q < g; ++q) prefetch_lines(src[q].u, (i + BIN_AHEAD) * isz, (i + BIN_AHEAD + BIN_V) * isz);
        if (load) {
          prefetch_lines(h, (i + BIN_AHEAD) * 8, (i + BIN_AHEAD + BIN_V) * 8);
          prefetch_lines(l, (i + BIN_AHEAD) * 8, (i + BIN_AHEAD + BIN_V) * 8);
        }
        if (Base) prefetch_lines(b, (i + BIN_AHEAD) * 8, (i + BIN_AHEAD + BIN_V) * 8);
        bin_d4 vh[BIN_VECS], vl[BIN_VECS], vb[BIN_VECS];
#pragma GCC unroll 4
        for (int v = 0; v < BIN_VECS; ++v) {
          if (load) {
            memcpy(&vh[v], h + i + 4 * v, sizeof(bin_d4));
            memcpy(&vl[v], l + i + 4 * v, sizeof(bin_d4));
          } else {
            vh[v] = vl[v] = bin_d4{};
          }
          if (Base) memcpy(&vb[v], b + i + 4 * v, sizeof(bin_d4));
        }
        // jk::binned_step four lanes at a time, in ReproBLAS's biased form: the group's q1 sum is kept as s1 + sum
        // (bh) and its q2 sum as s2 + lo (bl), so that adding or_last_bit(t) to bh rounds it onto unit1 (bh stays
        // in s1's binade, whose ulp is unit1, and a tie cannot occur) and bh - new bh is -q1, exactly: 4 adds a
        // term instead of 7, the same bits (jk_math.h).
        bin_d4 bh[BIN_VECS], bl[BIN_VECS];
#pragma GCC unroll 4
        for (int v = 0; v < BIN_VECS; ++v) {
          bh[v] = vs1;
          bl[v] = vs2 + vl[v];  // exact: lo is a multiple of ulp(s2), far inside its binade
        }
        for (int64_t q = 0; q < g; ++q) {
          const double wq = src[q].w;
          const bin_d4 vw = {wq, wq, wq, wq};
#pragma GCC unroll 4
          for (int v = 0; v < BIN_VECS; ++v) {
            bin_d4 x;
            src[q].four(i + 4 * v, x);
            if (Base) x = x - vb[v];
            const bin_d4 t = vw * x;
            const bin_d4 nh = bh[v] + (bin_d4)((bin_i4)t | bin_one);
            const bin_d4 rest = t + (bh[v] - nh);  // t - q1
            bh[v] = nh;
            bl[v] = bl[v] + (bin_d4)((bin_i4)rest | bin_one);
          }
        }
#pragma GCC unroll 4
        for (int v = 0; v < BIN_VECS; ++v) {
          vh[v] = vh[v] + (bh[v] - vs1);  // both exact
          vl[v] = bl[v] - vs2;
          if (last) {  // jk::binned_carry, its tie at -h moved to +h too
            const bin_d4 c = (vl[v] + vs1) - vs1;
            vh[v] = vh[v] + c;
            vl[v] = vl[v] - c;
            const bin_d4 unit = (bin_d4)((bin_i4)vunit & (vl[v] == -vhalf));
            vh[v] = vh[v] - unit;
            vl[v] = vl[v] + unit;
          }
          memcpy(h + i + 4 * v, &vh[v], sizeof(bin_d4));
          memcpy(l + i + 4 * v, &vl[v], sizeof(bin_d4));
        }
      }
      for (; i < len; ++i) {
        if (!load) h[i] = l[i] = 0.0;
        for (int64_t q = 0; q < g; ++q) {
          double x = src[q].at(i);
          if (Base) x = x - b[i];
          jk::binned_step(h[i], l[i], src[q].w * x, s1, s2);
        }
        if (last) jk::binned_carry(h[i], l[i], s1);
      }
    }
  };
#pragma omp parallel num_threads(wk.nthreads) if (wk.nthreads > 1)
  for (int64_t t = thread_index(); t < wk.nthreads; t += thread_count()) {
    const jk::IeeeMode ieee;
    for (int64_t ti = wk.share[t]; ti < wk.share[t + 1]; ++ti)
      for (int64_t it = wk.tiles[2 * ti]; it < wk.tiles[2 * ti + 1]; ++it) item(it);
  }
}

// Stats per (work item, update): non-finite count, sum of squares (f64), max |x|. Values are formed in S: f64 when
// the input or the accumulator is f64, or for int8 deltas; else f32, which is exact for f32/f16/bf16 inputs, and
// with a base gives the delta u - b rounded once (the difference of two floats is correctly rounded): the very x the
// fold adds. Squares are summed in f64.
// The sum is split over STAT_LANES partial sums (element i into lane i % STAT_LANES of its segment), added up at
// the end of the segment: the result does not depend on the thread count or the ISA path, and it is a reduction,
// held to a tolerance, not to bits.
// A NaN or inf anywhere makes the sum of squares non-finite; only then is a second loop run to count them (a sum that
// overflowed on huge finite f64 values takes that loop too, and counts nothing).
constexpr int64_t STAT_LANES = 16;

template <class S>
struct Lanes {
  double ss = 0;
  S mx = 0;
};

// Norms = false (a fold whose algorithm reads no norms): instead of the f64 sum of squares, a sum of x - x in S,
// which is 0 unless some x is NaN or inf: the same finiteness test at a fraction of the arithmetic (no conversions,
// no f64 lanes); the caller reports the norms as not measured.
template <bool Norms, class S>
static inline void stats_term(double& ss, S& chk, S x) {
  if constexpr (Norms) ss += (double)x * (double)x;
  else chk += x - x;
}

template <bool Norms, class S, class Value, class Ahead, class Also>
static inline void stats_seg(Lanes<S>& st, int64_t n, Value value, Ahead ahead, Also also) {
  // STAT_LANES independent partial sums and maxima: with one vector accumulator the loop waits on the add's latency
  // every 4 elements (f64 lanes); the fused admission ran at 83 ms instead of ~45 at N = 25M, k = 10.
  constexpr int64_t L = STAT_LANES;
  double ss[L] = {};
  S chk[L] = {};
  S mx[L] = {};
  int64_t i = 0;
  for (; i + L <= n; i += L) {
    ahead(i);
#pragma omp simd
    for (int64_t l = 0; l < L; ++l) {
      const S x = value(i + l), ax = std::fabs(x);
      stats_term<Norms>(ss[l], chk[l], x);
      mx[l] = ax > mx[l] ? ax : mx[l];
      also(i + l, x);
    }
  }
  for (int64_t l = 0; i < n; ++i, ++l) {
    const S x = value(i), ax = std::fabs(x);
    stats_term<Norms>(ss[l], chk[l], x);
    mx[l] = ax > mx[l] ? ax : mx[l];
    also(i, x);
  }
  double total = 0;
  S m = st.mx;
  for (int64_t l = 0; l < L; ++l) {
    total += Norms ? ss[l] : (double)chk[l];
    m = mx[l] > m ? mx[l] : m;
  }
  st.ss += total; st.mx = m;
}

// Prefetch what the stats loop reads STATS_AHEAD bytes on (the update, and the base where one is subtracted): the loop
// reads one update's piece alone, a single stream, and the hardware prefetchers, which start over at every 4 KB page
// and at every piece, left it waiting on its loads (43% of its samples on the load). Past the end it is harmless.
constexpr int64_t STATS_AHEAD = 2048;

template <bool Base, class In, class B>
static inline void stats_ahead(const In* u, const B* b) {
  __builtin_prefetch(reinterpret_cast<const char*>(u) + STATS_AHEAD);
  if constexpr (Base) __builtin_prefetch(reinterpret_cast<const char*>(b) + STATS_AHEAD * sizeof(B) / sizeof(In));
}

// The stats type (see Lanes above).
template <class A, class In, bool Base>
using StatT = std::conditional_t<std::is_same_v<A, double> || std::is_same_v<In, double> ||
                                     (Base && std::is_same_v<In, int8_t>),  // q * scale - b: two roundings in f32
                                 double, float>;

// Stats of x over [pos, pos + len) of one update (b: the base at pos), added to st and bad: one vectorized pass, and
// only if it saw a NaN/inf, an exact recount that skips them. A finite input whose value overflows S (its delta
// against the finite base, or q * scale) is out of range, not non-finite: it sets max-abs to inf, which admission
// refuses by name as the numpy and numba backends do (they form the value in f64 and see its size).
template <class A, class In, bool Base, bool Quant, bool Norms, class S, class Also>
static inline void stats_span(Lanes<S>& st, int64_t& bad, int64_t p, const float* scales, int64_t B,
                              const A* __restrict b, int64_t pos, int64_t len, Also also) {
  auto run = [&](int64_t n, auto value, auto input_finite, auto ahead, int64_t i0) {
    const Lanes<S> before = st;
    stats_seg<Norms>(st, n, value, ahead, [&](int64_t i, S x) { also(i0 + i, x); });
    if (!jk::is_finite(st.ss)) {
      st = before;
      for (int64_t q = 0; q < n; ++q) {
        const S x = value(q), ax = std::fabs(x);
        if (!std::isfinite(x)) {
          if (input_finite(q)) st.mx = std::numeric_limits<S>::infinity(); else ++bad;
          continue;
        }
        if constexpr (Norms) st.ss += (double)x * (double)x;
        st.mx = ax > st.mx ? ax : st.mx;
      }
    }
  };
  if constexpr (Quant) {
    const int8_t* q8 = reinterpret_cast<const int8_t*>(p) + pos;
    for_scale_segments(pos, len, B, [&](int64_t i0, int64_t i1, int64_t g) {
      const float sc = scales[g];
      run(i1 - i0, [=](int64_t i) -> S {
        S x = jk::dequant<S>(q8[i0 + i], sc);
        if constexpr (Base) x = x - (S)b[i0 + i];
        return x;
      }, [=](int64_t) { return std::isfinite(sc); },  // q * scale past S's range, from a finite scale
      [=](int64_t i) { stats_ahead<Base>(q8 + i0 + i, b ? b + i0 + i : nullptr); }, i0);
    });
  } else {
    const In* src = reinterpret_cast<const In*>(p) + pos;
    for_segments(src, len, [&](auto u, int64_t i0, int64_t n) {  // (u: src + i0, or float16 widened into a buffer)
      run(n, [=](int64_t i) -> S {
        S x = jk::load<S>(u[i]);
        if constexpr (Base) x = x - (S)b[i0 + i];
        return x;
      }, [=](int64_t i) { return Base && std::isfinite(jk::load<S>(u[i])); },
      [=](int64_t i) { stats_ahead<Base>(src + i0 + i, b ? b + i0 + i : nullptr); }, i0);
    });
  }
}

// Stats of update entry e over one piece [pos, pos + n), added into its (work item, update) outputs q = it * k + j
// (zeroed by the caller): the body of stats_rows and fold_stats_rows.
constexpr auto no_also = [](int64_t, auto) {};

template <class A, class In, bool Base, bool Quant, bool Norms = true, class Also = decltype(no_also)>
static inline void add_stats(const A* b, int64_t p, const float* scales, int64_t B, int64_t pos, int64_t n, int64_t q,
                             int64_t* nonfinite, double* sumsq, double* maxabs, Also also = no_also) {
  Lanes<StatT<A, In, Base>> st;
  st.mx = (StatT<A, In, Base>)maxabs[q];
  int64_t bad = 0;
  stats_span<A, In, Base, Quant, Norms>(st, bad, p, scales, B, b, pos, n, also);
  nonfinite[q] += bad;
  sumsq[q] += st.ss;
  maxabs[q] = (double)st.mx;
}

// Admission stats per (work item, update), through the fold's loop nest with one piece per work item: the same spans
// as a loop over items, and with many updates the same update-major tiles as the fold.
constexpr int64_t WHOLE_ITEMS = INT64_MAX;

template <class A, class In, bool Base, bool Quant>
static void stats_rows(const A* base, const int64_t* off, const int64_t* ptr, const int64_t* sptr,
                       const int64_t* blk, int64_t k, const Walk& wk, int64_t* nonfinite, double* sumsq,
                       double* maxabs) {
  for_blocks(off, ptr, k, wk, [&](int64_t it, int64_t e, int64_t p, int64_t pos, int64_t o, int64_t n) {
    const float* scales = Quant ? reinterpret_cast<const float*>(sptr[e]) : nullptr;
    add_stats<A, In, Base, Quant>(Base ? base + o : nullptr, p, scales, Quant ? blk[e] : 1, pos, n, it * k + e % k,
                                  nonfinite, sumsq, maxabs);
  }, no_done, WHOLE_ITEMS);
}

// Admission and fold in one pass, for a batch folded into an empty state (Norms = false: no sums of squares, for
// an algorithm that reads no norms; see stats_term): per block of each update, its stats (added into the (work
// item, update) outputs, zeroed by the caller) and its fold. Where the stats form x in the accumulator's type (S =
// A: every input but f64 into f32 and int8 against a base), the stats loop adds each x into the accumulator as it
// measures it (the memory stream never idles while a second loop re-reads the block from L2 and subtracts the base
// again: 25M x 10 f32 with a base 45-46 -> 37-38 ms, f16 75-78 -> 36-42 ms on 2 vCPUs, interleaved,
// bench/results/fused_one_loop_ab_epyc.txt); else the block's fold follows its stats while it is in cache.
// The updates are read from memory once instead of twice. If any update fails admission, the caller zeroes the
// accumulator again: it was all zeros, so that restores its bits. Per element the fold is fold_rows', bit for bit.
// Blocks of 32 KB of f32 per update: the stats' fixed cost per block (lanes, the non-finite check) amortized, and
// each update read in long runs. A block is one stream, read alone, and the hardware prefetchers start over at each
// one: 8 KB blocks (chosen to keep the block, its accumulator and base slices in L1 for the fold that follows)
// stalled the pass on its loads, 58-66 ms against 41-45 at N = 25M, k = 10 on 2 vCPUs (1.5-2x on one core, and
// 1.4x with a base); the fold finds the block in L2 as fast.
constexpr int64_t FUSED_SUB = 32 * SUB;

template <class A, class In, bool Base, bool Quant, bool Norms>
static void fold_stats_rows(A* acc, const A* base, const int64_t* off, const int64_t* ptr, const double* w,
                            const int64_t* sptr, const int64_t* blk, int64_t k, const Walk& wk, int64_t* nonfinite,
                            double* sumsq, double* maxabs) {
  for_blocks(off, ptr, k, wk, [&](int64_t it, int64_t e, int64_t p, int64_t pos, int64_t o, int64_t n) {
    const A* b = Base ? base + o : nullptr;
    const float* scales = Quant ? reinterpret_cast<const float*>(sptr[e]) : nullptr;
    if constexpr (std::is_same_v<StatT<A, In, Base>, A>) {  // the stats' x is the fold's: added as it is measured
      A* __restrict a = acc + o;
      const A wj = (A)w[e];
      add_stats<A, In, Base, Quant, Norms>(b, p, scales, Quant ? blk[e] : 1, pos, n, it * k + e % k, nonfinite,
                                           sumsq, maxabs, [=](int64_t i, A x) { a[i] = jk::fold_step(a[i], wj, x); });
      return;
    }
    add_stats<A, In, Base, Quant, Norms>(b, p, scales, Quant ? blk[e] : 1, pos, n, it * k + e % k, nonfinite, sumsq,
                                         maxabs);
    if constexpr (Quant)
      fold_block_q<A, Base>(acc + o, b, reinterpret_cast<const int8_t*>(p) + pos, scales, pos, blk[e], (A)w[e], n);
    else
      fold_block<A, In, Base>(acc + o, b, reinterpret_cast<const In*>(p) + pos, (A)w[e], n);
  }, no_done, FUSED_SUB);
}

template <class A, class Out, bool Base>
static void finalize_rows(const A* acc, const A* base, const int64_t* off, const double* total_w,
                          const int64_t* optr, const int64_t* work, int64_t m, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t it = 0; it < m; ++it) {
    const jk::IeeeMode ieee;  // (per item: two MXCSR writes against a chunk's pass)
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

// Server optimizer step at finalize, one pass over (acc, x, m[, v]): d = acc / W, then jk::opt_step updates x, m
// and v in place and the new x is narrowed into the output. Reads 3-4 and writes 2-3 acc-sized streams, plus out.
// The span loop takes restrict parameters: inside the OpenMP region, restrict on local pointers is lost, and the
// alias checks five streams would need exceed what the vectorizer versions a loop for.
template <int Kind, class A, class Out>
static inline void step_span(const A* __restrict a, A* __restrict x, A* __restrict m, A* __restrict v,
                             Out* __restrict o, int64_t len, A W, const jk::OptCoef<A> c) {
  for (int64_t i = 0; i < len; ++i) {
    A xi = x[i], mi = m[i], vi = Kind >= jk::OPT_ADAM ? v[i] : (A)0;
    jk::opt_step<Kind>(jk::final_value(a[i], W), xi, mi, vi, c);
    x[i] = xi;
    m[i] = mi;
    if (Kind >= jk::OPT_ADAM) v[i] = vi;
    jk::narrow_to(o + i, xi);
  }
}

template <int Kind, class A, class Out>
static void step_rows(const A* acc, A* x, A* m, A* v, const int64_t* off, const double* total_w, const int64_t* optr,
                      const int64_t* work, int64_t nwork, jk::OptCoef<A> c, int nthreads) {
#pragma omp parallel for schedule(static) num_threads(nthreads)
  for (int64_t it = 0; it < nwork; ++it) {
    const jk::IeeeMode ieee;
    const int64_t r = work[3 * it], s = work[3 * it + 1], len = work[3 * it + 2], o0 = off[r] + s;
    step_span<Kind, A, Out>(acc + o0, x + o0, m + o0, Kind >= jk::OPT_ADAM ? v + o0 : nullptr,
                            reinterpret_cast<Out*>(optr[r]) + s, len, (A)total_w[r], c);
  }
}

// The non-finite values and max |x| of the finite ones in x[0, n), on nthreads threads: a base's or an output's
// finiteness check and max |x| in one pass, where numpy takes two single-threaded reductions (and isfinite a
// temporary of the array's size). Lanes, as the probe's, so that loads bound the loop, of float ops only (a count
// in the loop kept it from vectorizing): x - x is 0 unless x is NaN or inf, and only a chunk whose sum of those is
// not 0 is counted again, element by element, as stats_span does.
template <class T>
static void finite_maxabs(const T* x, int64_t n, int nthreads, int64_t& bad, double& mx) {
  constexpr int L = 16;
  const int64_t C = 1 << 16;
  int64_t b = 0;
  double m = 0;
#pragma omp parallel for schedule(static) reduction(+ : b) reduction(max : m) num_threads(nthreads)
  for (int64_t c = 0; c < (n + C - 1) / C; ++c) {
    const jk::IeeeMode ieee;  // (a caller's DAZ read a subnormal maximum as 0, on its own thread only: found in review)
    T lm[L] = {}, chk[L] = {};
    const int64_t lo = c * C, hi = std::min(n, lo + C);
    int64_t i = lo;
    for (; i + L <= hi; i += L)
#pragma omp simd
      for (int l = 0; l < L; ++l) {
        const T v = x[i + l], ax = std::fabs(v);
        chk[l] += v - v;
        lm[l] = ax > lm[l] ? ax : lm[l];
      }
    for (int l = 0; i < hi; ++i, ++l) {
      const T v = x[i], ax = std::fabs(v);
      chk[l] += v - v;
      lm[l] = ax > lm[l] ? ax : lm[l];
    }
    T sum = 0, top = 0;
    for (int l = 0; l < L; ++l) {
      sum += chk[l];
      top = lm[l] > top ? lm[l] : top;
    }
    if (sum != 0) {  // NaN: a NaN or an inf in the chunk (inf - inf); their max was skipped or is inf: again
      top = 0;
      for (i = lo; i < hi; ++i) {
        const T ax = std::fabs(x[i]);
        if (ax <= std::numeric_limits<T>::max()) top = ax > top ? ax : top; else ++b;
      }
    }
    m = std::max(m, (double)top);
  }
  bad = b;
  mx = m;
}

// Read-bandwidth probe: 32 independent f32 lanes per thread, so that loads, not add latency, bound the loop.
static double probe_sum(const float* x, int64_t n, int nthreads) {
  double total = 0;
  const int64_t C = 1 << 16;
#pragma omp parallel for schedule(static) reduction(+ : total) num_threads(nthreads)
  for (int64_t c = 0; c < (n + C - 1) / C; ++c) {
    float lanes[32] = {0};
    const int64_t lo = c * C, hi = std::min(n, lo + C);
    int64_t i = lo;
    for (; i + 32 <= hi; i += 32)
      for (int l = 0; l < 32; ++l) lanes[l] += x[i + l];
    for (; i < hi; ++i) lanes[0] += x[i];
    for (int l = 0; l < 32; ++l) total += lanes[l];
  }
  return total;
}
