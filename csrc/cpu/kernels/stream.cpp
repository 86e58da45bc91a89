#include "../vec.h"
#include "../loop.h"
#include "kernels.h"

namespace fusedopt::cpu::CPU_CAPABILITY {

// a += s·b: the in-place stream kernel (12 B/element in fp32) the benchmark
// uses as this machine's bandwidth ceiling, measured in the same run.
void stream(float* a, const float* b, float s, int64_t n) {
  using V = at::vec::Vectorized<float>;
  constexpr int64_t W = V::size();
  at::parallel_for(0, n, kChunk, [&](int64_t lo, int64_t hi) {
    int64_t i = lo;
    for (; i + W <= hi; i += W) fo::fma(V(s), V::loadu(b + i), V::loadu(a + i)).store(a + i);
    for (; i < hi; ++i) a[i] = fo::fma(s, b[i], a[i]);
  });
}

}  // namespace fusedopt::cpu::CPU_CAPABILITY
