"""How the GPU's TF32 tensor-core product rounds its sum into the fp32 accumulator: to nearest, or toward zero.

    python benchmarks/mma_rounding.py          (on the GPU machine; CuPy)

EFFICIENT's fp32 path adds three TF32 products a k-step into one fp32 accumulator (efficient_common.cuh,
Tf32Ops). If each `mma.sync ... .f32.tf32.tf32.f32` truncates, its errors all point toward zero and add up:
benchmarks/tf32_error_model.py puts dq at 5-20x PyTorch's fp32 error then, against 1.2x when rounded to
nearest, and the GPU tests' occasional fp32 failures at head dim 128 saw 8x. One warp runs one m16n8k8 product
a case, every B element b, C = c, and every A element a ("8 products": each D element is c + 8ab) or A's first
column only ("1 product": c + ab); the cases put the products' sum at fractions of c's ulp, where rounding to
nearest and toward zero give different fp32 values (and eight products each below c's ulp tell whether they are
cut to c's ulp before they are summed). It prints each case's D against both and a verdict.
"""
from __future__ import annotations

import numpy as np

SOURCE = r"""
extern "C" __global__ void mma_case(const float* a, const float* b, const float* c, const int* single, float* d) {
    const int i = blockIdx.x;
    // a and b are TF32 values already (low 13 bits zero): their bits go in as they are. A fragment: (row g, col t),
    // (g + 8, t), (g, t + 4), (g + 8, t + 4) with t = lane % 4; "1 product": column 0 only
    const unsigned ta = __float_as_uint(a[i]), tb = __float_as_uint(b[i]);
    const unsigned a01 = !single[i] || threadIdx.x % 4 == 0 ? ta : 0u, a23 = single[i] ? 0u : ta;
    float d0, d1, d2, d3;
    asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
                 "{%8, %9}, {%10, %11, %12, %13};\n"
                 : "=f"(d0), "=f"(d1), "=f"(d2), "=f"(d3)
                 : "r"(a01), "r"(a01), "r"(a23), "r"(a23), "r"(tb), "r"(tb), "f"(c[i]), "f"(c[i]), "f"(c[i]),
                   "f"(c[i]));
    // every row and column of D took the same sum: one value, or NaN where they differ
    if (threadIdx.x == 0) d[i] = d0 == d1 && d0 == d2 && d0 == d3 ? d0 : __int_as_float(0x7fc00000);
}
"""

ULP = 2.0**-23  # of 1.0


def cases():
    """(name, a, b, c, products): the products' sum as a fraction of ulp(c) = ULP, signs both ways."""
    out = []
    for n, frac, a, b_mant in ((8, 0.75, 2.0**-13, 0.75), (8, 0.25, 2.0**-13, 0.25), (8, 1.75, 2.0**-12, 0.875),
                               (1, 0.75, 2.0**-10, 0.75), (1, 1.75, 2.0**-10, 1.75)):
        b = b_mant * 2.0**-13
        assert n * a * b == frac * ULP
        out += [(f"{n} x: 1 + {frac} ulp", a, b, 1.0, n), (f"{n} x: -1 - {frac} ulp", -a, b, -1.0, n)]
    return out


def expected(a, b, c, n, toward_zero: bool) -> np.float32:
    exact = c + n * a * b  # exact in float64
    nearest = np.float32(exact)
    if toward_zero and abs(float(nearest)) > abs(exact):
        return np.nextafter(nearest, np.float32(0))
    return nearest


def main() -> int:
    import cupy

    rows = cases()
    a, b, c = (cupy.asarray(np.array([r[i] for r in rows], np.float32)) for i in (1, 2, 3))
    single = cupy.asarray(np.array([r[4] == 1 for r in rows], np.int32))
    d = cupy.zeros(len(rows), np.float32)
    cupy.RawKernel(SOURCE, "mma_case")((len(rows),), (32,), (a, b, c, single, d))
    got = d.get()
    print(f"GPU: {cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}")
    print(f"{'case':22s} {'D - c (ulp)':>12s} {'nearest':>8s} {'toward 0':>8s}")
    votes = {"nearest": 0, "toward zero": 0}
    for (name, ai, bi, ci, n), g in zip(rows, got):
        rn, rz = expected(ai, bi, ci, n, False), expected(ai, bi, ci, n, True)
        votes["nearest"] += g == rn
        votes["toward zero"] += g == rz
        print(f"{name:22s} {(float(g) - ci) / ULP:12.3f} {str(g == rn):>8s} {str(g == rz):>8s}")
    told = [k for k, v in votes.items() if v == len(rows)]
    print("verdict: " + (" and ".join(told) if told else "neither (another rounding)"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
