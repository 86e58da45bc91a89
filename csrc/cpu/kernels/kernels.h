#pragma once
// The CPU kernels, compiled once per ISA into fusedopt::cpu::{DEFAULT,AVX2,AVX512}
// (setup.py); csrc/cpu/ops.cpp picks one namespace at run time.
#include "fusedopt/launch.h"
#include "fusedopt/math/adagrad.h"
#include "fusedopt/math/adam.h"
#include "fusedopt/math/rmsprop.h"
#include "fusedopt/math/sgd.h"

#define FUSEDOPT_DECLARE_CPU_KERNELS(ISA)                                      \
  namespace fusedopt::cpu::ISA {                                               \
  void sgd(const OptimizerCall<math::SgdHyper>& call);                         \
  void adagrad(const OptimizerCall<math::AdagradHyper>& call);                 \
  void rmsprop(const OptimizerCall<math::RmspropHyper>& call);                 \
  void adam(const OptimizerCall<math::AdamHyper>& call);                       \
  void stream(float* a, const float* b, float s, int64_t n);                   \
  }

FUSEDOPT_DECLARE_CPU_KERNELS(DEFAULT)
FUSEDOPT_DECLARE_CPU_KERNELS(AVX2)
FUSEDOPT_DECLARE_CPU_KERNELS(AVX512)
