"""Correctness of every backend against the reference: the harness the GPU tests use and the cases
``python -m cusdpa check`` runs.

``run_case`` runs one attention case through a backend and judges it against the float64 reference.
The yardstick is DESIGN.md's: the backend's error may be at most 2x (3x for gradients) the error of
the same computation done by PyTorch at the same precision, plus a small floor (``FLOOR``). PyTorch's
version here is the FlashAttention recipe written in torch ops: scores from the low-precision inputs
accumulated in fp32, fp32 softmax, probabilities rounded to the input dtype before P @ V. Outputs and gradients are poisoned with NaN before the backend runs, so an element it
never writes fails the comparison. Needs torch (CPU or CUDA) for that yardstick.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import numpy as np

from .. import dispatch, environment, philox, problem, reference
from ..dispatch import Backend
from . import judge

# The floor of the error rule, relative to max|reference|: the unit roundoff of fp16 and bf16 (their
# output rounding dominates the yardstick anyway); 32 units for fp32, where nothing rounds coarsely and
# the order of summation alone moves fp32 gradients by several units (7 seen on dk, kernel vs torch).
FLOOR = {"float16": 2.0**-11, "bfloat16": 2.0**-8, "float32": 2.0**-19}


@dataclass(frozen=True)
class Case:
    dtype: str = "bfloat16"
    batch: tuple = (2,)
    hq: int = 2
    hkv: int = 2
    L: int = 33
    S: int = 47
    E: int = 64
    Ev: int | None = None  # None: same as E
    causal: str | None = None  # None, "upper_left" or "lower_right"
    window: tuple | None = None
    dropout_p: float = 0.0
    kv_batch_broadcast: bool = False  # key/value with batch dims of size 1
    transposed: bool = False  # q/k/v are (..., L, H, E) arrays viewed as (..., H, L, E)
    varlen: tuple | None = field(default=None)  # ((Lb, Sb), ...) per sequence: packed layout

    @property
    def ev(self) -> int:
        return self.E if self.Ev is None else self.Ev

    def options(self) -> problem.Options:
        return problem.Options(dropout_p=self.dropout_p, is_causal=self.causal is not None,
                               causal_variant=self.causal or "upper_left", window=self.window,
                               enable_gqa=self.hq != self.hkv)


def np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def _rounded(rng, shape, dtype: str, transposed: bool) -> np.ndarray:
    """Random values exactly representable in ``dtype``, stored in that dtype."""
    if transposed:  # make (..., R, H, D) and view it as (..., H, R, D)
        shape = shape[:-3] + (shape[-2], shape[-3], shape[-1])
        return rng.standard_normal(shape).astype(np.float32).astype(np_dtype(dtype)).swapaxes(-2, -3)
    return rng.standard_normal(shape).astype(np.float32).astype(np_dtype(dtype))


def make_inputs(case: Case, rng):
    """NumPy q, k, v, dout in the case's dtype (dense or packed), plus cu_seqlens for varlen."""
    if case.varlen is not None:
        lq, lk = [lb for lb, _ in case.varlen], [sb for _, sb in case.varlen]
        cu_q = np.concatenate([[0], np.cumsum(lq)]).astype(np.int32)
        cu_k = np.concatenate([[0], np.cumsum(lk)]).astype(np.int32)
        q = _rounded(rng, (int(cu_q[-1]), case.hq, case.E), case.dtype, False)
        k = _rounded(rng, (int(cu_k[-1]), case.hkv, case.E), case.dtype, False)
        v = _rounded(rng, (int(cu_k[-1]), case.hkv, case.ev), case.dtype, False)
        dout = _rounded(rng, (int(cu_q[-1]), case.hq, case.ev), case.dtype, False)
        return q, k, v, dout, (cu_q, cu_k, max(lq + [0]), max(lk + [0]))
    kvb = tuple(1 for _ in case.batch) if case.kv_batch_broadcast else case.batch
    q = _rounded(rng, case.batch + (case.hq, case.L, case.E), case.dtype, case.transposed)
    k = _rounded(rng, kvb + (case.hkv, case.S, case.E), case.dtype, case.transposed)
    v = _rounded(rng, kvb + (case.hkv, case.S, case.ev), case.dtype, case.transposed)
    dout = _rounded(rng, case.batch + (case.hq, case.L, case.ev), case.dtype, False)
    return q, k, v, dout, None


def make_problem(case: Case, arrays, seed: int):
    q, k, v, _, vl = arrays
    if vl is None:
        return problem.from_dense(q, k, v, None, case.options(), seed)
    return problem.from_varlen(q, k, v, *vl, case.options(), seed)


# ---- PyTorch at the same precision ---------------------------------------------------------------------

def _torch_dense(torch, q, k, v, dout, case: Case, L, S, bh0: int, seed: int, device):
    """(out, lse, dq, dk, dv) of one dense (batch..., H, L, E) problem, FlashAttention numerics in torch."""
    dt = getattr(torch, case.dtype)
    tq, tk, tv = (torch.tensor(x.astype(np.float32), device=device).to(dt).requires_grad_() for x in (q, k, v))
    group = case.hq // case.hkv
    kr, vr = tk.repeat_interleave(group, -3), tv.repeat_interleave(group, -3)
    s = (tq.float() @ kr.float().transpose(-1, -2)) * (case.E ** -0.5)
    allowed = reference.structural_mask(L, S, case.causal is not None, case.causal == "lower_right", case.window)
    allowed = torch.ones((L, S), dtype=torch.bool, device=device) if allowed is None else \
        torch.tensor(allowed, device=device)
    row_any = allowed.any(-1, keepdim=True)
    s_masked = torch.where(allowed, s, -torch.inf)
    lse = torch.logsumexp(s_masked, -1)
    # rows that see nothing get finite scores and then P = 0, so no NaN enters the backward
    P = torch.where(row_any, torch.softmax(torch.where(row_any, s_masked, 0.0), -1), 0.0)
    if case.dropout_p > 0:
        nbh = int(np.prod(q.shape[:-2]))
        keep = philox.keep_mask(seed, 0, np.arange(bh0, bh0 + nbh), L, S, case.dropout_p).reshape(q.shape[:-2] + (L, S))
        P = P * torch.tensor(keep, device=device) / (1 - case.dropout_p)
    out = P.to(dt) @ vr
    out.backward(torch.tensor(dout.astype(np.float32), device=device).to(dt))
    return [x.detach().float().cpu().numpy() for x in (out, lse, tq.grad, tk.grad, tv.grad)]


def torch_same_precision(case: Case, arrays, seed: int, device: str):
    import torch

    q, k, v, dout, vl = arrays
    if vl is None:
        return _torch_dense(torch, q, k, v, dout, case, case.L, case.S, 0, seed, device)
    cu_q, cu_k = vl[0], vl[1]
    out = np.zeros(dout.shape, np.float32)
    lse = np.zeros((case.hq, q.shape[0]), np.float32)
    dq, dk, dv = (np.zeros(x.shape, np.float32) for x in (q, k, v))
    for b in range(len(cu_q) - 1):
        qs, ks = slice(cu_q[b], cu_q[b + 1]), slice(cu_k[b], cu_k[b + 1])
        per = [x[r].swapaxes(0, 1) for x, r in ((q, qs), (k, ks), (v, ks), (dout, qs))]
        o, l, gq, gk, gv = _torch_dense(torch, *per, case, qs.stop - qs.start, ks.stop - ks.start, b * case.hq,
                                        seed, device)
        out[qs], lse[:, qs], dq[qs], dk[ks], dv[ks] = (x.swapaxes(0, 1) if x.ndim == 3 else x
                                                      for x in (o, l, gq, gk, gv))
    return out, lse, dq, dk, dv


# ---- one case ------------------------------------------------------------------------------------------

def _device_arrays(case: Case, arrays, xp):
    """The case's q, k, v, dout and varlen offsets as arrays of ``xp`` (strided views kept strided)."""
    def to_xp(x, transposed=False):
        if xp is np:
            return x
        if transposed:  # keep the strided view on the device: copy the contiguous base, view it again
            return xp.asarray(np.ascontiguousarray(x.swapaxes(-2, -3))).swapaxes(-2, -3)
        return xp.asarray(x)

    dev = [to_xp(x, case.transposed) for x in arrays[:3]] + [to_xp(arrays[3])]
    vl = None if arrays[4] is None else (to_xp(arrays[4][0]), to_xp(arrays[4][1]), arrays[4][2], arrays[4][3])
    return dev, vl


def unsupported(case: Case, impl, xp, grads: bool = True) -> list[str]:
    """Why ``impl`` cannot run ``case`` on arrays of ``xp`` (empty when it can), from the backend itself."""
    rng = np.random.default_rng(0)
    dev, vl = _device_arrays(case, make_inputs(case, rng), xp)
    return impl.not_supported_reasons(make_problem(case, (*dev[:3], None, vl), 0), need_grad=grads)


def run_case(case: Case, impl, xp, rng, *, grads: bool = True, torch_device: str = "cpu") -> list[str]:
    """Failures of ``impl`` (a dispatch.Implementation) on ``case`` with arrays of module ``xp``."""
    arrays = make_inputs(case, rng)
    seed = int(rng.integers(0, 2**63))
    dev, vl = _device_arrays(case, arrays, xp)
    pr = make_problem(case, (*dev[:3], None, vl), seed)
    ref_pr = make_problem(case, (*(x.astype(np.float64) for x in arrays[:3]), None, arrays[4]), seed)

    out = xp.full(pr.out_shape, np.nan, dtype=pr.dtype)
    lse = xp.full(pr.lse_shape, np.nan, dtype=np.float32)
    got_out, got_lse = impl.forward(pr, out=out, lse=lse)
    ref_out, ref_lse = reference.forward(ref_pr)
    base = torch_same_precision(case, arrays, seed, torch_device)
    floor = FLOOR[case.dtype]
    failures = [judge.judge("out", got_out, ref_out, base[0], 2.0, floor),
                judge.judge("lse", got_lse, ref_lse, base[1], 2.0, 2e-5)]
    if grads:
        dout = dev[3]
        poisoned = tuple(xp.full(x.shape, np.nan, dtype=pr.dtype) for x in (pr.q, pr.k, pr.v))
        got = impl.backward(pr, got_out, got_lse, dout, False, poisoned)
        want = reference.backward(ref_pr, arrays[3].astype(np.float64))
        for name, g, w, b in zip(("dq", "dk", "dv"), got, want, base[2:]):
            failures.append(judge.judge(name, g, w, b, 3.0, floor))
    return [f"{case}: {f}" for f in failures if f]


# ---- the suite of ``python -m cusdpa check`` ---------------------------------------------------------------

def suite(dtype: str, simulator: bool) -> list[Case]:
    """Random cases covering each feature once, in ``dtype``; tiny ones where kernels run on the simulator."""
    if simulator:  # Numba's CUDA simulator runs each GPU thread as a Python thread
        return [Case(dtype, batch=(1,), hq=2, hkv=1, L=5, S=7, E=8, causal="lower_right"),
                Case(dtype, batch=(1,), L=6, S=6, E=4, Ev=8, causal="upper_left", window=(2, 0), dropout_p=0.3),
                Case(dtype, hq=2, hkv=2, E=8, varlen=((3, 5), (4, 2)), causal="upper_left")]
    return [Case(dtype, batch=(2,), hq=4, hkv=4, L=97, S=97, E=64, causal="upper_left"),
            Case(dtype, batch=(1,), hq=4, hkv=2, L=33, S=130, E=40, causal="lower_right"),
            Case(dtype, batch=(2,), L=65, S=65, E=128, causal="upper_left", window=(16, 0)),
            Case(dtype, batch=(1,), L=70, S=70, E=72, dropout_p=0.2),
            Case(dtype, L=50, S=50, E=64, transposed=True),
            Case(dtype, hq=2, hkv=1, E=64, varlen=((37, 37), (64, 80), (1, 5)), causal="upper_left")]


@dataclass
class Outcome:
    """What ``check`` found for one backend on one array type."""

    target: str  # e.g. "FLASH (cupy)"
    passed: int = 0
    failed: int = 0
    not_supported: int = 0
    failures: list = field(default_factory=list)  # messages, one or more per failed case
    skipped: str | None = None  # why the backend did not run at all


def simulator_config():
    """Tiny tiles under the simulator (several tiles even at L = 5), the default knobs elsewhere."""
    if not environment.simulator_enabled():
        return contextlib.nullcontext()
    import kernels_numba

    return kernels_numba.configured(kernels_numba.KernelConfig(variant="portable", block_rows=8, tile_rows=4))


def targets(backends) -> list[tuple[Backend, str]]:
    """(backend, array module name) pairs to check: every backend on CuPy arrays (reported as skipped,
    with the reason, where no GPU is usable), MATH on NumPy arrays too (the reference path), and
    EFFICIENT on NumPy arrays instead when Numba simulates the GPU."""
    out = []
    for b in backends:
        simulated = b is Backend.EFFICIENT and environment.simulator_enabled()
        out.append((b, "numpy" if simulated else "cupy"))
        if b is Backend.MATH:
            out.append((b, "numpy"))
    return out


def check_target(backend: Backend, xp_name: str, rng) -> Outcome:
    """Run the suite through one backend on one array type; exceptions count as failures."""
    outcome = Outcome(f"{backend.name} ({xp_name})")
    impl = dispatch.implementation(backend)
    reasons = impl.environment_reasons(None)
    if xp_name == "cupy" and not reasons and environment.cupy_problem():
        reasons = [environment.cupy_problem()]
    if reasons:
        outcome.skipped = "; ".join(reasons)
        return outcome
    if xp_name == "cupy":
        import cupy as xp
    else:
        xp = np
    simulator = xp is np and backend is Backend.EFFICIENT
    dtypes = [d for d in ("float16", "bfloat16", "float32") if d in impl.capabilities.dtypes]
    # Only this backend enabled: EFFICIENT takes NumPy arrays only while MATH (their default) is disabled.
    with dispatch.sdpa_kernel([backend]), simulator_config() if simulator else contextlib.nullcontext():
        for dtype in dtypes:
            for case in suite(dtype, simulator):
                try:
                    if unsupported(case, impl, xp):
                        outcome.not_supported += 1
                        continue
                    failures = run_case(case, impl, xp, rng, torch_device="cpu" if xp is np else "cuda")
                except Exception as e:  # a crash is a failure of this case, reported with its type
                    failures = [f"{case}: {type(e).__name__}: {e}"]
                outcome.failures += failures
                outcome.failed += bool(failures)
                outcome.passed += not failures
    return outcome
