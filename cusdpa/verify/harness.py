"""The one harness that runs attention and judges it, for every test, ``python -m cusdpa check`` (its suite
and its fuzz) and the bench.

``expect(pr, dout)`` computes what a problem's outputs are judged against: the float64 reference
(cusdpa.reference, on the problem's own device) and the bounds that judge.py's rule derives from the
yardstick (yardstick.same_precision). ``judged(expected, outputs)`` judges outputs computed anywhere
(NumPy or CuPy arrays, torch tensors). On top of those:

  ``run_problem``  a backend's forward and backward on a validated Problem;
  ``run_case``     the same on a ``Case``, a description of a random problem (what tests, check and fuzz draw);
  ``run_torch``    a function with torch's SDPA signature (the bridge) on torch tensors, with autograd.

Outputs and gradients are poisoned with NaN before a backend writes them, so an element it never
writes fails the comparison. Needs torch (CPU or CUDA) for the yardstick.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from .. import problem, reference
from ..block_mask import BlockMask
from . import judge, yardstick

GRADS = ("dq", "dk", "dv", "dmask")


@dataclass(frozen=True, repr=False)
class Case:
    """A random attention problem: its sizes and options; the values are drawn by ``build``."""

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
    softcap: float = 0.0
    seed: int | None = None  # the dropout seed; None: drawn by ``build``
    offset: int = 0  # the dropout offset
    mask: str | None = None  # None, "bool" or "float"
    mask_shape: tuple | None = None  # broadcasting to (*batch, hq, L, S); None: that full shape
    mask_dtype: str | None = None  # a float mask's dtype; None: the inputs'
    block_mask: bool = False  # the mask given as a cusdpa.BlockMask (FLASH's backward reuses the forward's summary)
    kv_batch_broadcast: bool = False  # key/value with batch dims of size 1
    transposed: bool = False  # q/k/v are (..., L, H, E) arrays viewed as (..., H, L, E)
    varlen: tuple | None = None  # ((Lb, Sb), ...) per sequence: packed layout
    alibi: str | None = None  # ALiBi slopes: None, "head" (Hq,) or "batch" (*batch or sequences, Hq)

    def __repr__(self) -> str:
        """The fields that differ from the defaults, as an expression that rebuilds the case."""
        changed = [f"{f.name}={getattr(self, f.name)!r}" for f in dataclasses.fields(self)
                   if getattr(self, f.name) != f.default]
        return f"Case({', '.join(changed)})"

    @property
    def ev(self) -> int:
        return self.E if self.Ev is None else self.Ev

    def options(self) -> problem.Options:
        return problem.Options(dropout_p=self.dropout_p, is_causal=self.causal is not None,
                               causal_variant=self.causal or "upper_left", window=self.window,
                               enable_gqa=self.hq != self.hkv, softcap=self.softcap)


def np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)


def draw(rng, shape, dtype: str) -> np.ndarray:
    """Standard normal values exactly representable in ``dtype``, stored in that dtype (on the host)."""
    return rng.standard_normal(shape).astype(np.float32).astype(np_dtype(dtype))


def _qkv(case: Case, rng, xp):
    """q, k, v and varlen arguments of ``case`` as arrays of ``xp``; transposed ones are strided views made
    on the device from contiguous (..., R, H, D) arrays."""
    def place(shape, transposed):
        if not transposed:
            return xp.asarray(draw(rng, shape, case.dtype))
        return xp.asarray(draw(rng, shape[:-3] + (shape[-2], shape[-3], shape[-1]), case.dtype)).swapaxes(-2, -3)

    if case.varlen is not None:
        lq, lk = [lb for lb, _ in case.varlen], [sb for _, sb in case.varlen]
        cu_q, cu_k = (np.concatenate([[0], np.cumsum(n)]).astype(np.int32) for n in (lq, lk))
        q, k, v = (place((int(cu[-1]), h, d), False)
                   for cu, h, d in ((cu_q, case.hq, case.E), (cu_k, case.hkv, case.E), (cu_k, case.hkv, case.ev)))
        return q, k, v, (xp.asarray(cu_q), xp.asarray(cu_k), max(lq + [0]), max(lk + [0]))
    kvb = tuple(1 for _ in case.batch) if case.kv_batch_broadcast else case.batch
    q = place(case.batch + (case.hq, case.L, case.E), case.transposed)
    k = place(kvb + (case.hkv, case.S, case.E), case.transposed)
    v = place(kvb + (case.hkv, case.S, case.ev), case.transposed)
    return q, k, v, None


def _mask(case: Case, rng, xp):
    """A bool mask (a quarter of the keys hidden) or a float mask (normal values, a tenth -inf), or None."""
    if case.mask is None:
        return None
    shape = case.mask_shape or case.batch + (case.hq, case.L, case.S)
    if case.mask == "bool":
        return xp.asarray(rng.random(shape) > 0.25)
    values = np.where(rng.random(shape) < 0.1, -np.inf, rng.standard_normal(shape))
    return xp.asarray(values.astype(np.float32).astype(np_dtype(case.mask_dtype or case.dtype)))


def _slopes(case: Case, rng, xp):
    """ALiBi slopes in (0, 0.5), float32, per query head or per batch (sequence) and query head, or None."""
    if case.alibi is None:
        return None
    lead = () if case.alibi == "head" else ((len(case.varlen),) if case.varlen is not None else case.batch)
    return xp.asarray((0.5 * rng.random(lead + (case.hq,))).astype(np.float32))


def build(case: Case, xp, rng) -> problem.Problem:
    """The validated Problem of ``case`` with values drawn from ``rng``, on arrays of ``xp``."""
    q, k, v, vl = _qkv(case, rng, xp)
    mask = _mask(case, rng, xp)
    if case.block_mask:
        mask = BlockMask(mask)
    seed = (int(rng.integers(0, 2**63)) if case.seed is None else case.seed, case.offset)
    slopes = _slopes(case, rng, xp)
    if vl is None:
        return problem.from_dense(q, k, v, mask, case.options(), seed, alibi_slopes=slopes)
    return problem.from_varlen(q, k, v, *vl, case.options(), seed, alibi_slopes=slopes)


# ---- judging -------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Expected:
    """What one problem's outputs are judged against, by output name (out, lse, dq, dk, dv, dmask)."""

    truth: dict  # the float64 reference
    bounds: dict  # judge.Bound from the yardstick's error


def _float64(pr: problem.Problem) -> problem.Problem:
    """``pr`` with float64 copies of its inputs (and of a float mask), on the same device."""
    mask = judge.to_float64(pr.mask) if pr.mask_kind == "float" else pr.mask
    return dataclasses.replace(pr, q=judge.to_float64(pr.q), k=judge.to_float64(pr.k), v=judge.to_float64(pr.v),
                               mask=mask, dtype=np.dtype(np.float64))


def expect(pr: problem.Problem, dout=None) -> Expected:
    """The reference and the bounds of ``pr``'s out and lse, and of its gradients for ``dout`` (an array of
    ``pr.xp`` shaped like out) when given."""
    base_out, base_lse, base_grads = yardstick.same_precision(pr, dout)
    wide = _float64(pr)
    truth = dict(zip(("out", "lse"), reference.forward(wide)))
    base = {"out": base_out, "lse": base_lse}
    if dout is not None:
        truth.update(zip(GRADS, reference.backward(wide, judge.to_float64(dout))))
        base.update(zip(GRADS, base_grads))
    dtypes = dict.fromkeys(truth, pr.dtype_name)
    if pr.mask_kind == "float":
        # dS is formed at the inputs' precision and rounded to the mask's dtype: the coarser of the two sets
        # its floor (an fp64 mask's gradient is fp32 arithmetic for fp32 inputs, not fp64's)
        dtypes["dmask"] = judge.coarser(pr.dtype_name, pr.mask.dtype.name)
    return Expected(truth, {name: judge.bound(name, truth[name], base[name], dtypes[name]) for name in truth})


def judged(expected: Expected, outputs: dict) -> tuple[dict, list[str]]:
    """(max error of each output against the reference, the verdicts of those beyond their bound).
    ``outputs`` maps names to NumPy/CuPy arrays or torch tensors."""
    errors, failures = {}, []
    for name, x in outputs.items():
        if type(x).__module__.startswith("torch"):
            x = yardstick.as_float64(x)
        errors[name] = judge.max_error(x, expected.truth[name])
        verdict = expected.bounds[name].verdict(errors[name])
        if verdict:
            failures.append(verdict)
    return errors, failures


# ---- running -------------------------------------------------------------------------------------------

def run_problem(pr: problem.Problem, impl, rng, grads: bool = True, mask_grad: bool = True) -> list[str]:
    """Failures of ``impl`` (a dispatch.Implementation) on ``pr``, forward and, with ``grads``, backward for
    an output gradient drawn from ``rng`` (a float mask's gradient too where ``mask_grad``)."""
    xp = pr.xp
    dout = xp.asarray(draw(rng, pr.out_shape, pr.dtype_name)) if grads else None
    out, lse = impl.forward(pr, out=xp.full(pr.out_shape, np.nan, dtype=pr.dtype),
                            lse=xp.full(pr.lse_shape, np.nan, dtype=np.float32))
    outputs = {"out": out, "lse": lse}
    if grads:
        wrt = [pr.q, pr.k, pr.v] + ([pr.mask] if pr.mask_kind == "float" and mask_grad else [])
        poisoned = tuple(xp.full(x.shape, np.nan, dtype=x.dtype) for x in wrt)
        outputs.update(zip(GRADS, impl.backward(pr, out, lse, dout, False, poisoned)))
    return judged(expect(pr, dout), outputs)[1]


def run_case(case: Case, impl, xp, rng, *, grads: bool = True, mask_grad: bool = True) -> list[str]:
    """Failures of ``impl`` on ``case`` with arrays of module ``xp``, each prefixed with the case."""
    return [f"{case}: {f}" for f in run_problem(build(case, xp, rng), impl, rng, grads, mask_grad)]


def run_torch(attention, q, k, v, attn_mask=None, *, rng, seed=None, **options) -> list[str]:
    """Failures of ``attention`` (torch's SDPA signature, e.g. interop.scaled_dot_product_attention) on torch
    tensors: its output's dtype and device, its values, and the gradients of the inputs that require grad
    for an output gradient drawn from ``rng``. ``options`` are cusdpa.problem.Options fields; ``seed``
    is the dropout seed ``attention`` draws (set torch's generator so that it draws that one)."""
    import torch

    from interop import bridge  # torch tensors as the NumPy/CuPy arrays a Problem takes, without copies

    out = attention(q, k, v, attn_mask, **options)
    if out.dtype != q.dtype or out.device != q.device:
        return [f"output is {out.dtype} on {out.device}, inputs are {q.dtype} on {q.device}"]
    with bridge.on_stream(out.device):  # CuPy on the tensors' device, ordered after torch's work
        arrays = [None if x is None else bridge.as_array(x) for x in (q, k, v, attn_mask)]
        pr = problem.from_dense(*arrays, problem.Options(**options), seed)
        names = {name: x for name, x in zip(GRADS, (q, k, v, attn_mask)) if x is not None and x.requires_grad}
        outputs, dout = {"out": out}, None
        if names:
            dout = pr.xp.asarray(draw(rng, pr.out_shape, pr.dtype_name))
            grads = torch.autograd.grad(out, list(names.values()), yardstick.as_tensor(dout, out.device))
            outputs.update(zip(names, grads))
        return judged(expect(pr, dout), outputs)[1]
