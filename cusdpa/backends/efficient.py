"""EFFICIENT: memory-efficient attention in Numba CUDA (kernels_numba); fp16/bf16/fp32, every mask kind.

On CuPy arrays the kernels run on the GPU. On NumPy arrays they run on Numba's CUDA simulator, and
only when asked for: with NUMBA_ENABLE_CUDASIM=1 set before numba is imported, and with MATH
disabled, i.e. inside ``cusdpa.sdpa_kernel([Backend.EFFICIENT])``. MATH stays the default on NumPy
arrays because the simulator is a CPU emulation of a GPU, for tests on tiny shapes.

A repeated dense call replays a plan (cusdpa.backends.plans) of its launches, recorded by ``plan``.
"""
from __future__ import annotations

import dataclasses

from .. import dispatch, environment
from ..dispatch import Backend, Capabilities, Implementation
from . import plans
from .launch import SLOTS, Launch, Slot

CAPABILITIES = Capabilities(dtypes=frozenset({"float16", "bfloat16", "float32"}), max_head_dim=256,
                            zero_head_dim=False, softcap=False, alibi=False)


def _environment_reasons(pr):
    reasons = []
    on_numpy = pr is not None and pr.xp.__name__ == "numpy"
    if pr is not None:
        if on_numpy and not environment.simulator_enabled():
            reasons.append("takes NumPy arrays only on the CUDA simulator (set NUMBA_ENABLE_CUDASIM=1 before "
                           "importing numba and select EFFICIENT with sdpa_kernel)")
        elif on_numpy and Backend.MATH in dispatch.enabled_backends():
            reasons.append("runs NumPy arrays on the CUDA simulator only when MATH is disabled "
                           "(sdpa_kernel([Backend.EFFICIENT])); MATH is the default on NumPy")
        elif not on_numpy and environment.simulator_enabled():
            reasons.append("NUMBA_ENABLE_CUDASIM=1 makes Numba simulate the GPU, which takes NumPy arrays only")
    if reasons:
        return reasons
    problem = environment.numba_cuda_problem()
    if problem:
        return [problem]
    if pr is not None:
        import kernels_numba

        reasons.extend(kernels_numba.reasons(pr))
    return reasons


def _forward(pr, out=None, lse=None):
    import kernels_numba

    return kernels_numba.forward(pr, out, lse)


def _backward(pr, out, lse, dout, deterministic=False, grads=None):
    # Atomics only in the fused backward (KernelConfig.fused_backward_head_dim) and a broadcast float mask's summed
    # gradient (KernelConfig.tensor_core_mask_grad_sum), which ``deterministic`` turns down.
    import kernels_numba

    return kernels_numba.backward(pr, out, lse, dout, grads, deterministic=deterministic)


IMPL = Implementation(backend=Backend.EFFICIENT, capabilities=CAPABILITIES, environment_reasons=_environment_reasons,
                      forward=_forward, backward=_backward)


# Made-up addresses of the two recordings (``plan``): operand n of recording r at (n + 1) << 40 plus
# r << 36, far from every length, stride and scale a parameter cell holds, and below 2**63 (so typed as a
# real address is: an int64); and their dropout seeds, every word distinct.
_SPACING, _SECOND = 1 << 40, 1 << 36
_SEEDS = (0x9E3779B97F4A7C15 >> 1, 0xD1B54A32D192ED03 >> 1)
_OPERANDS = ("q", "k", "v", "mask", "o", "lse", "do", "delta", "dq", "dk", "dv", "dq_accum")


_ACCUM_POSITION = SLOTS.index("dq_accum")


class _Allocates(Exception):
    """The recorded kernels asked for memory the call itself would allocate."""


def plan(pr, out_strides: tuple, backward: bool, dout_strides: tuple | None = None, addresses: dict | None = None,
         deterministic: bool = False):
    """The Plan of a dense problem EFFICIENT runs, found by recording its launches (kernels_numba's
    ``launcher.recording``) twice, on stand-in arrays of the problem's shapes, strides and dtypes at two sets
    of made-up addresses with two dropout seeds: a parameter cell that differs between the recordings and
    holds the same operand's address (or seed word) in both becomes that operand's slot; a cell equal in both
    is a constant. Out is laid out with ``out_strides``, dout with ``dout_strides`` (default: as out); delta,
    dq, dk and dv are contiguous, and the fused backward's dQ accumulator (unless ``deterministic``) is the
    plan's workspace (plans.Plan).

    None where a recorded cell differs but holds no operand (an address inside one: a copy or an offset view),
    where Numba's own path must launch a kernel, for varlen or empty problems, or operands not read in place at
    ``addresses`` (callers plan no float mask whose gradient is wanted); plans.NOT_YET where a kernel could
    not be prepared without a launch or the path allocated memory (the general path then runs, preparing both).
    Nothing runs on the GPU: a recording issues no kernel, and CuPy may allocate nothing meanwhile."""
    import cupy
    import kernels_numba
    from kernels_numba import launcher

    if pr.varlen is not None or pr.offset or pr.q.size == 0 or pr.k.size == 0 or pr.alibi_slopes is not None:
        return None
    operands = {"q": pr.q, "k": pr.k, "v": pr.v, "mask": pr.mask}
    if any(x is not None and x.data.ptr != (addresses or {}).get(name) for name, x in operands.items()):
        return None  # not read where the caller's replay points
    if pr.mask is None:
        del operands["mask"]
    itemsize = pr.dtype.itemsize
    shapes = {"o": (pr.out_shape, tuple(s * itemsize for s in out_strides), pr.dtype),
              "lse": (pr.lse_shape, None, "float32"), "delta": (pr.lse_shape, None, "float32")}
    accum = 0
    if backward:
        dout = out_strides if dout_strides is None else dout_strides
        shapes["do"] = (pr.out_shape, tuple(s * itemsize for s in dout), pr.dtype)
        shapes.update({g: (x.shape, None, pr.dtype) for g, x in (("dq", pr.q), ("dk", pr.k), ("dv", pr.v))})
        if kernels_numba.fuses(pr, kernels_numba.current(), deterministic):
            accum = kernels_numba.dq_accum_elements(pr)
            shapes["dq_accum"] = ((accum,), None, "float32")
    for name, x in operands.items():
        shapes[name] = (x.shape, x.strides, x.dtype)
    device = pr.q.device.id
    records, values = [], []
    for r in range(2):
        fake = {name: _stand_in(cupy, device, shape, strides, dtype, (_OPERANDS.index(name) + 1) * _SPACING +
                                r * _SECOND + (operands[name].data.ptr % 256 if name in operands else 0))
                for name, (shape, strides, dtype) in shapes.items()}
        seed = _SEEDS[r]
        stand_in = dataclasses.replace(pr, q=fake["q"], k=fake["k"], v=fake["v"], mask=fake.get("mask"), seed=seed)
        try:
            with cupy.cuda.Device(device), cupy.cuda.using_allocator(_refuse), launcher.recording() as recorded:
                kernels_numba.forward(stand_in, fake["o"], fake["lse"])
                n_forward = len(recorded)
                if backward:
                    kernels_numba.backward(stand_in, fake["o"], fake["lse"], fake["do"],
                                           (fake["dq"], fake["dk"], fake["dv"]), delta=fake["delta"],
                                           deterministic=deterministic, dq_accum=fake.get("dq_accum"))
        except _Allocates:
            return plans.NOT_YET
        except Exception:  # noqa: BLE001 -- a plan only saves host time: whatever the recording meets, the
            return None    # general path serves the call (the GPU tests assert that plans are made)
        if launcher.NUMBA_ONLY in recorded:
            return None
        if launcher.NOT_PREPARED in recorded:
            return plans.NOT_YET
        records.append(recorded)
        values.append({**{name: x.data.ptr for name, x in fake.items()},
                       "seed_lo": seed & 0xFFFFFFFF, "seed_hi": seed >> 32})
    launches = _slotted(*records, *values)
    if launches is None:
        return None
    if not any(position == _ACCUM_POSITION for launch in launches for _, position in launch.slots):
        accum = 0  # the backward did not fuse (a head dim, layout or mask it does not take): no workspace
    return plans.Plan(device, pr.out_shape, tuple(out_strides), pr.lse_shape, tuple(launches[:n_forward]),
                      tuple(launches[n_forward:]), Backend.EFFICIENT.value, dq_accum_elements=accum)


def _slotted(first: list, second: list, first_values: dict, second_values: dict) -> list | None:
    """The Launches of two recordings of the same calls: cells that differ become the Slot of the one operand
    whose values they hold in both (None if there is none, or if functions, grids, blocks or shared memory
    differ). A kernel launched with more than 48 KiB of dynamic shared memory had its limit raised when the
    general path launched it or the recording prepared it (kernels_numba.launcher), which a replay keeps."""
    by_pair = {(first_values[name], second_values[name]): name for name in first_values}
    launches = []
    for (fn, grid, block, cells, smem), (fn2, grid2, block2, cells2, smem2) in zip(first, second):
        if (fn, grid, block, len(cells), smem) != (fn2, grid2, block2, len(cells2), smem2) or grid[2] != 1 \
                or block[1:] != (1, 1):
            return None
        args = []
        for a, b in zip(cells, cells2):
            if a == b:
                args.append(a)
            elif (a, b) in by_pair:
                args.append(Slot(by_pair[a, b]))
            else:
                return None
        launches.append(Launch(_Function(fn), grid[:2], block[:1], smem, args))
    return launches if len(first) == len(second) else None


@dataclasses.dataclass(frozen=True)
class _Function:
    """A kernel's CUfunction handle as Launch takes one (``.ptr``)."""

    ptr: int


def _stand_in(cupy, device: int, shape: tuple, strides, dtype, address: int):
    """A CuPy array of this shape, byte strides (None: C order) and dtype at a made-up address (never read)."""
    memory = cupy.cuda.UnownedMemory(address, 1, None, device)
    return cupy.ndarray(shape, dtype, cupy.cuda.MemoryPointer(memory, 0), strides)


def _refuse(size: int):
    raise _Allocates(size)
