#pragma once
// Compile-time switches (mamba's BOOL_SWITCH): a runtime value picks one of a
// few instantiations once per call; inside kernels the value is a constexpr.
#include <ATen/Dispatch.h>

#include "fusedopt/math/common.h"

#define FUSEDOPT_BOOL_SWITCH(COND, NAME, ...) \
  [&] {                                        \
    if (COND) {                                \
      constexpr bool NAME = true;              \
      return __VA_ARGS__();                    \
    } else {                                   \
      constexpr bool NAME = false;             \
      return __VA_ARGS__();                    \
    }                                          \
  }()

#define FUSEDOPT_DECAY_SWITCH(DECAY, NAME, ...)                          \
  [&] {                                                                   \
    switch (DECAY) {                                                      \
      case ::fusedopt::math::Decay::coupled: {                            \
        constexpr auto NAME = ::fusedopt::math::Decay::coupled;           \
        return __VA_ARGS__();                                             \
      }                                                                   \
      case ::fusedopt::math::Decay::decoupled: {                          \
        constexpr auto NAME = ::fusedopt::math::Decay::decoupled;         \
        return __VA_ARGS__();                                             \
      }                                                                   \
      default: {                                                          \
        constexpr auto NAME = ::fusedopt::math::Decay::none;              \
        return __VA_ARGS__();                                             \
      }                                                                   \
    }                                                                     \
  }()

// fp32, fp64, fp16, bf16 parameters; scalar_t names the storage type.
#define FUSEDOPT_DISPATCH_FLOATING(TYPE, NAME, ...) \
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, TYPE, NAME, __VA_ARGS__)
