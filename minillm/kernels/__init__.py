"""Fused operators of minillm (imported as ``minillm.kernels``).

* ``noise`` — the counter-based noise every backend computes (PyTorch definition);
* ``reference`` — PyTorch references of the perturbed linear and the FMS reduction;
* ``noise_triton``, ``perturbed_linear``, ``fms_scores`` — Triton kernels and launchers;
* ``cpp`` — loader and wrappers of the C++ CPU operators in ``minillm/csrc/``;
* ``ops`` — the entry points callers use, dispatched by device (CUDA → Triton, CPU → C++,
  else reference; ``MINILLM_BACKEND`` forces one).

Submodules are imported on demand so that the reference path needs neither Triton nor a compiler.
"""
