#pragma once
// The CPU kernels, compiled once per ISA into fusedopt::cpu::{DEFAULT,AVX2,AVX512}
// (setup.py); csrc/cpu/ops.cpp picks one namespace at run time.
#include "fusedopt/dropout.h"
#include "fusedopt/launch.h"
#include "fusedopt/math/adagrad.h"
#include "fusedopt/math/adam.h"
#include "fusedopt/math/rmsprop.h"
#include "fusedopt/math/sgd.h"

#define FUSEDOPT_DECLARE_CPU_KERNELS(ISA)                                      \
  namespace fusedopt::cpu::ISA {                                               \
  void update(const OptimizerCall<math::SgdHyper>& call);                    \
  void update(const OptimizerCall<math::AdagradHyper>& call);                \
  void update(const OptimizerCall<math::RmspropHyper>& call);                \
  void update(const OptimizerCall<math::AdamHyper>& call);                   \
  void stream(float* a, const float* b, float s, int64_t n);                   \
  /* dropout (kernels/dropout.cpp, ops in dropout_ops.cpp) */                  \
  void dropout(const DropoutCall& c);                                          \
  void dropout_strided(const DropoutCall& c);                                  \
  void bias_dropout_add(const DropoutCall& c);                                 \
  void bias_dropout_add_backward(const DropoutCall& c);                        \
  void keep_bits(const DropoutCall& c, uint8_t* out);                          \
  void philox_words(const uint32_t* counters, uint32_t* out, int64_t n, uint64_t seed); \
  }

FUSEDOPT_DECLARE_CPU_KERNELS(DEFAULT)
FUSEDOPT_DECLARE_CPU_KERNELS(AVX2)
FUSEDOPT_DECLARE_CPU_KERNELS(AVX512)
