#pragma once
// Compile-time switches (mamba's BOOL_SWITCH): a runtime value picks one of a
// few instantiations once per call; inside kernels the value is a constexpr.
#include <ATen/Dispatch.h>

#include <type_traits>

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

// The storage of a validated optimizer call as compile-time names: scalar_t
// (params and grads), state_t (the state lists, Note [State dtype] in
// fusedopt/checks.h) and SR (stochastic rounding of the params, Note
// [Stochastic rounding]). Combinations gather() refuses (fp32 state of fp32
// or fp64 params, stochastic rounding of other than bf16) are not compiled.
#define FUSEDOPT_DISPATCH_STORAGE(CALL, NAME, ...)                                                  \
  FUSEDOPT_DISPATCH_FLOATING((CALL).dtype, NAME, [&] {                                              \
    FUSEDOPT_BOOL_SWITCH((CALL).state_dtype != (CALL).dtype, FP32_STATE_, [&] {                     \
      FUSEDOPT_BOOL_SWITCH((CALL).common.stochastic_rounding, SR, [&] {                             \
        using state_t = std::conditional_t<FP32_STATE_, float, scalar_t>;                          \
        if constexpr ((!FP32_STATE_ || sizeof(scalar_t) == 2) && (!SR || std::is_same_v<scalar_t, at::BFloat16>)) \
          __VA_ARGS__();                                                                            \
      });                                                                                           \
    });                                                                                             \
  })
