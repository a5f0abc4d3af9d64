"""The Triton kernels compile for a Hopper GPU (sm_90) on a machine without one.

The interpreter tests check numerics but not the compiled path (constexpr specialization,
layouts of the noise reshape, ``tl.dot`` operand types); this builds PTX and cubin for the
dtypes, kinds and flags with Triton's bundled ptxas, in a subprocess so that the
``TRITON_INTERPRET`` set by the interpreter tests does not apply.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from minillm.kernels import fms_scores, noise_triton, perturbed_linear

    target = GPUTarget("cuda", 90, 32)

    def build(fn, sig, consts, **opts):
        names = list(sig)
        src = ASTSource(fn, sig, {(names.index(k),): v for k, v in consts.items()})
        return triton.compile(src, target=target, options=opts)

    cases = [(dt, kind, False, True, 32) for dt in ["bf16", "fp32"] for kind in [0, 1, 2]]
    cases += [("bf16", 0, True, True, 32), ("fp16", 2, True, True, 32)]
    cases += [("bf16", 0, False, False, 64), ("bf16", 1, False, True, 64)]  # unpaired; BK 64
    for dt, kind, gauss, paired, bk in cases:
        sig = {n: f"*{dt}" for n in ["x_ptr", "w_ptr", "b_ptr", "y_ptr"]}
        sig |= {n: "i32" for n in ["H", "N", "K", "stride_xm", "stride_xk", "stride_wn",
                                    "stride_wk", "stride_ym", "stride_yn", "key"]}
        sig["eps"] = "fp32"
        consts = dict(PAIRED=paired, KIND=kind, GAUSSIAN=gauss, HAS_BIAS=True,
                      IEEE=dt == "fp32", UPCAST=False, BM=64, BN=64, BK=bk, GROUP_M=8)
        sig |= {k: "constexpr" for k in consts}
        build(perturbed_linear._perturbed_linear_kernel, sig, consts, num_warps=4)
    for dt in ["bf16", "fp32"]:
        sig = {"x_ptr": f"*{dt}", "sq_ptr": "*fp32", "s_ptr": "*fp32", "M": "i32", "K": "i32",
               "stride_xm": "i32", "stride_xk": "i32"}
        consts = dict(ROWS=512, BM=32, BK=128)
        sig |= {k: "constexpr" for k in consts}
        build(perturbed_linear._column_stats_kernel, sig, consts, num_warps=4)
    for gauss in [False, True]:
        sig = {"w_ptr": "*bf16", "xn_ptr": "*fp32", "keys_ptr": "*i32", "coeffs_ptr": "*fp32",
               "rows_ptr": "*fp32", "cols_ptr": "*fp32", "N": "i32", "K": "i32", "S": "i32",
               "stride_wn": "i32", "stride_wk": "i32"}
        consts = dict(GAUSSIAN=gauss, BN=64, BK=128)
        sig |= {k: "constexpr" for k in consts}
        build(fms_scores._fms_kernel, sig, consts, num_warps=4)
        sig = {"out_ptr": "*fp32", "key": "i32", "rows": "i32", "cols": "i32",
               "row_start": "i32", "col_start": "i32"}
        consts = dict(GAUSSIAN=gauss, BK=32, BN=16)
        sig |= {k: "constexpr" for k in consts}
        build(noise_triton._noise_kernel, sig, consts, num_warps=4)
    print("compiled")
    """
)


def test_kernels_compile_for_sm90() -> None:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0 and "compiled" in out.stdout, out.stderr[-3000:]
