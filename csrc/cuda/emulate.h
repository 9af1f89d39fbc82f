// Host emulation of the CUDA execution model, for checking kernels.cu without a GPU.
//
// With JK_HOST_EMULATION defined, kernels.cu compiles with g++: a kernel is a plain function that reads the
// globals blockIdx / threadIdx / blockDim, and jk_emu::launch runs its grid as loops (block by block, thread by
// thread) over the same index math the GPU runs. A warp is one thread here (lane 0, shuffles are the identity) and
// atomics are plain read-modify-writes: the loops run one thread at a time, so nothing races.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__
#define __launch_bounds__(...)

struct jk_dim3 { unsigned x = 0, y = 0, z = 0; };
extern thread_local jk_dim3 blockIdx, threadIdx, blockDim;

namespace jk_emu {

template <class... P, size_t... I>
void call(void (*f)(P...), void** args, std::index_sequence<I...>) {
  f(*static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(args[I])...);
}

// args[i] points to the i-th argument's value, as in cuLaunchKernel's kernelParams.
template <class... P>
void launch(void (*f)(P...), unsigned grid, unsigned block, void** args) {
  blockDim.x = block;
  for (unsigned b = 0; b < grid; ++b) {
    blockIdx.x = b;
    for (unsigned t = 0; t < block; ++t) {
      threadIdx.x = t;
      call(f, args, std::index_sequence_for<P...>{});
    }
  }
}

}  // namespace jk_emu

inline unsigned long long atomicAdd(unsigned long long* p, unsigned long long v) { auto o = *p; *p = o + v; return o; }
inline double atomicAdd(double* p, double v) { double o = *p; *p = o + v; return o; }
inline unsigned long long atomicMax(unsigned long long* p, unsigned long long v) {
  auto o = *p; *p = o > v ? o : v; return o;
}
inline long long __double_as_longlong(double x) { long long u; memcpy(&u, &x, 8); return u; }
