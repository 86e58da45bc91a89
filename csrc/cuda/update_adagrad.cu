// The Adagrad update kernels: every dtype and compile-time variant (update.cuh).
#include "update.cuh"

namespace fusedopt::cuda {

void update(const OptimizerCall<math::AdagradHyper>& call, const Launch& l) { launch_updates(call, l); }

}  // namespace fusedopt::cuda
