#pragma once
// Run-time choice among the per-ISA builds of the CPU kernels (Note [Per-ISA
// CPU kernels] in setup.py), shared by the optimizer and the dropout ops.
#include <c10/util/Exception.h>

#include <cstdlib>
#include <string>

namespace fusedopt::cpu {

enum class Isa { DEFAULT, AVX2, AVX512 };

// The widest ISA this CPU runs and this build has (FUSEDOPT_WITHOUT_<ISA>:
// Note [Sanitizer build] in setup.py), or FUSEDOPT_CPU_ISA (DEFAULT, AVX2,
// AVX512) when set (read at every call), so tests can run every build of the
// kernels.
inline Isa pick_isa() {
  static const Isa best = [] {
    __builtin_cpu_init();
#ifndef FUSEDOPT_WITHOUT_AVX512
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
        __builtin_cpu_supports("bmi2"))  // pext: Note [bf16 in lanes]
      return Isa::AVX512;
#endif
#ifndef FUSEDOPT_WITHOUT_AVX2
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::AVX2;
#endif
    return Isa::DEFAULT;
  }();
  const char* env = std::getenv("FUSEDOPT_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  TORCH_CHECK(want == "AVX512" || want == "AVX2" || want == "DEFAULT",
              "FUSEDOPT_CPU_ISA must be DEFAULT, AVX2 or AVX512, got ", want);
  const Isa forced = want == "AVX512" ? Isa::AVX512 : want == "AVX2" ? Isa::AVX2 : Isa::DEFAULT;
  TORCH_CHECK(forced <= best, "FUSEDOPT_CPU_ISA=", want, " is not supported by this CPU or this build");
  return forced;
}

}  // namespace fusedopt::cpu

// Calls fusedopt::cpu::<ISA>::NAME(...) for the ISA pick_isa() returns; used
// inside namespace fusedopt::cpu. An ISA left out of the build is never named.
#ifdef FUSEDOPT_WITHOUT_AVX512
#define FUSEDOPT_AVX512_CASE(NAME, ...)
#else
#define FUSEDOPT_AVX512_CASE(NAME, ...) case Isa::AVX512: AVX512::NAME(__VA_ARGS__); break;
#endif
#ifdef FUSEDOPT_WITHOUT_AVX2
#define FUSEDOPT_AVX2_CASE(NAME, ...)
#else
#define FUSEDOPT_AVX2_CASE(NAME, ...) case Isa::AVX2: AVX2::NAME(__VA_ARGS__); break;
#endif
#define FUSEDOPT_ISA_CALL(NAME, ...)                    \
  switch (pick_isa()) {                                 \
    FUSEDOPT_AVX512_CASE(NAME, __VA_ARGS__)             \
    FUSEDOPT_AVX2_CASE(NAME, __VA_ARGS__)               \
    default: DEFAULT::NAME(__VA_ARGS__); break;         \
  }
