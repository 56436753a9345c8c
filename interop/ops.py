"""The torch.library custom ops: dense and variable-length attention, forward and backward.

The ops are thin and functional: nothing is mutated and no global state decides a result (the plan cache
only remembers how a signature was launched). Their option arguments are the fields of
``cusdpa.problem.Options``, their schema written from those fields. The dropout seed and the backends to
try are inputs, so eager mode, a compiled graph and a backward on autograd's own thread all see the same
keep-mask and the same dispatch. Outputs are allocated by torch (its caching allocator owns them).

A dense call on CUDA tensors looks its signature up once (``cusdpa.backends.plans``): a hit
allocates the outputs and replays the prepared launches on raw pointers; the first call of a signature,
and every call no plan covers (FLASH's and EFFICIENT's), validates, dispatches and runs the backend on
array views. The ops carry no autograd formula: ``interop.autograd`` differentiates them, in eager mode and
(through AOTAutograd) in compiled graphs alike.

In torch.profiler tables each call shows as the op (``cusdpa::sdpa_fwd``, ``cusdpa::varlen_bwd``, ...)
with the backend that ran nested inside it (``cusdpa::flash_fwd``, ``cusdpa::math_bwd``, ...).
"""
from __future__ import annotations

import dataclasses
import functools

import torch

from cusdpa import dispatch, problem
from cusdpa.backends import plans
from cusdpa.backends.flash import launches
from cusdpa.dispatch import Backend
from cusdpa.errors import ArgumentError

from . import arguments, bridge, mask_summaries

Tensor = torch.Tensor

# Schema types of the Options fields (``from __future__ import annotations`` makes each field's type its
# source text); an option of another type fails here, at import, for whoever adds it.
_SCHEMA_TYPES = {"float": "float", "bool": "bool", "Optional[float]": "float?", "str": "str",
                 "Optional[tuple[int, int]]": "int[]?"}
OPTIONS_SCHEMA = ", ".join(f"{_SCHEMA_TYPES[f.type]} {f.name}" for f in dataclasses.fields(problem.Options))

_lib = torch.library.Library("cusdpa", "DEF")
_lib.define(f"sdpa_fwd(Tensor query, Tensor key, Tensor value, Tensor? attn_mask, Tensor? alibi_slopes, "
            f"{OPTIONS_SCHEMA}, Tensor? seed, str backends) -> (Tensor, Tensor)")
_lib.define(f"sdpa_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor? attn_mask, Tensor? alibi_slopes, "
            f"Tensor out, Tensor lse, {OPTIONS_SCHEMA}, Tensor? seed, str backends, bool deterministic, "
            "bool mask_grad) -> (Tensor, Tensor, Tensor, Tensor)")
_lib.define(f"varlen_fwd(Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
            f"Tensor? alibi_slopes, SymInt max_seqlen_q, SymInt max_seqlen_k, {OPTIONS_SCHEMA}, Tensor? seed, "
            "str backends) -> (Tensor, Tensor)")
_lib.define(f"varlen_bwd(Tensor grad_out, Tensor query, Tensor key, Tensor value, Tensor cu_seqlens_q, "
            f"Tensor cu_seqlens_k, Tensor? alibi_slopes, Tensor out, Tensor lse, SymInt max_seqlen_q, "
            f"SymInt max_seqlen_k, {OPTIONS_SCHEMA}, Tensor? seed, str backends, bool deterministic) "
            "-> (Tensor, Tensor, Tensor)")

sdpa_fwd = torch.ops.cusdpa.sdpa_fwd.default
sdpa_bwd = torch.ops.cusdpa.sdpa_bwd.default
varlen_fwd = torch.ops.cusdpa.varlen_fwd.default
varlen_bwd = torch.ops.cusdpa.varlen_bwd.default


def plain_eager(tensors) -> bool:
    """Plain eager mode: no compilation, profiler, functorch transform or dispatch mode, and every tensor of
    ``tensors`` (None allowed) of class Tensor, not meta (a subclass or meta tensor: the dispatcher decides,
    the meta kernel being the fake op)."""
    if (torch.compiler.is_compiling() or torch.autograd.profiler._is_profiler_enabled
            or torch._C._len_torch_dispatch_stack() or torch._C._are_functorch_transforms_active()):
        return False
    for a in tensors:
        if a is not None and (type(a) is not Tensor or a.is_meta):
            return False
    return True


def call(op, *args):
    """``op(*args)``; in plain eager mode (``plain_eager``) its kernel is called directly, which is what the
    dispatcher would call, without boxing a dozen arguments into it and back (a few microseconds of host time
    per call)."""
    kernel = _KERNELS.get(op)
    if kernel is None or not plain_eager(args[:kernel[1]]):
        return op(*args)
    return kernel[0](*args)


_KERNELS: dict = {}  # op -> (its CPU/CUDA kernel, how many of its leading arguments are tensors)


def _implement(name: str, tensors: int, eager: bool = False):
    """Register the decorated function as the op's CPU and CUDA kernel (CPU tensors run the reference). The
    Autograd key falls through: the op has no gradient of its own (interop.autograd's Function is its
    derivative), so a direct call on tensors that require grad returns outputs that do not. ``eager``: the
    function takes ``eager=True`` where ``call`` runs it directly (plain eager mode), never from the
    dispatcher (compiled graphs among its callers)."""
    def register(fn):
        _lib.impl(name, fn, "CPU")
        _lib.impl(name, fn, "CUDA")
        _lib.impl(name, torch.library.fallthrough_kernel, "Autograd")
        _KERNELS[getattr(torch.ops.cusdpa, name).default] = (functools.partial(fn, eager=True) if eager else fn,
                                                             tensors)
        return fn

    return register


def _autocast(name: str, floats: int):
    """Autocast kernels (CUDA and CPU) of the forward op ``name``: its first ``floats`` arguments cast as
    PyTorch's SDPA casts its inputs under ``torch.autocast`` (``arguments.autocast``), then the op below
    autocast. The torch entry points cast before the autograd Function (so gradients flow through the
    casts); this serves the op called on its own."""
    op = getattr(torch.ops.cusdpa, name).default
    for device_type in ("cuda", "cpu"):
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)
        below = torch._C.DispatchKeySet(getattr(torch._C.DispatchKey, key))

        def kernel(*args, device_type=device_type, below=below):
            dtype = torch.get_autocast_dtype(device_type)
            with torch._C._ExcludeDispatchKeyGuard(below):
                return op(*arguments.autocast(dtype, *args[:floats]), *args[floats:])

        _lib.impl(name, kernel, key)


_autocast("sdpa_fwd", floats=4)
_autocast("varlen_fwd", floats=3)


def dense_out_shape(query: Tensor, key: Tensor, value: Tensor) -> tuple:
    """Output shape (..., Hq, L, Ev) of dense attention, symbolic sizes included (for the fake ops)."""
    rank = max(query.dim(), key.dim(), value.dim())
    batch = torch.broadcast_shapes(*(x.shape[:-3] for x in (query, key, value)))
    hq = query.shape[-3] if query.dim() >= 3 else 1  # rank-2 inputs have one head
    shape = (*batch, hq, query.shape[-2], value.shape[-1])
    return shape[len(shape) - rank:]


def _ranged(backend: str, kind: str, fn, *args):
    """``fn(*args)``, inside a profiler range ``cusdpa::{backend}_{kind}`` when a profiler runs: record_function
    costs ~15 us per call even with none running, and a ``with`` block of a null context a third of a
    microsecond of every call on the CPU machine, where this branch costs a tenth."""
    if torch.autograd.profiler._is_profiler_enabled:
        with torch.profiler.record_function(f"cusdpa::{backend}_{kind}"):
            return fn(*args)
    return fn(*args)


def _arrays(*tensors):
    return [None if t is None else bridge.as_array(t) for t in tensors]


def seed_of(seed: Tensor | None, dropout_p: float) -> int:
    """The dropout seed the ops take (an int64 CPU tensor, or None without dropout) as an int."""
    if seed is None:
        if dropout_p > 0:
            raise ArgumentError(f"dropout_p={dropout_p} needs a seed tensor: the op draws no randomness itself")
        return 0
    return int(seed.item()) & (2**64 - 1)  # a CPU tensor: reading it never waits on a GPU


def _select(pr: problem.Problem, backends: str, need_grad: bool, mask_grad: bool = False) -> dispatch.Implementation:
    """The backend that runs ``pr`` among ``backends`` (comma-separated Backend values, in priority order);
    ``mask_grad``: a float attn_mask's gradient is wanted too."""
    with dispatch.sdpa_kernel([Backend(name) for name in backends.split(",")], set_priority=True):
        return dispatch.select(pr, need_grad, mask_grad)


# ---- plans --------------------------------------------------------------------------------------------

_WINDOW = problem.OPTION_NAMES.index("window")  # the one option the ops take as a list (unhashable)


def _signature(query, key, value, attn_mask, options: tuple, backends: str) -> tuple:
    """What decides a dense call's launches: shapes, strides, dtypes, devices, 16-byte alignment, options; an
    attn_mask's shape, strides, dtype, device and whether its base is a whole number of key pairs."""
    window = options[_WINDOW]
    if window is not None:
        options = options[:_WINDOW] + (tuple(window),) + options[_WINDOW + 1:]
    mask = None if attn_mask is None else (attn_mask.shape, attn_mask.stride(), attn_mask.dtype,
                                           attn_mask.get_device(),
                                           attn_mask.data_ptr() % (2 * attn_mask.element_size()) == 0)
    return ("torch", query.shape, query.stride(), key.shape, key.stride(), value.shape, value.stride(), query.dtype,
            key.dtype, value.dtype, query.get_device(), key.get_device(), value.get_device(),
            (query.data_ptr() | key.data_ptr() | value.data_ptr()) % 16 == 0, mask, options, backends,
            dispatch.kernel_config_key())


def _addresses(query, key, value, attn_mask) -> dict:
    """The base addresses a replay passes, which a plan's problem must read in place."""
    return {"q": query.data_ptr(), "k": key.data_ptr(), "v": value.data_ptr(),
            "mask": None if attn_mask is None else attn_mask.data_ptr()}


_native = None  # interop.native, once imported (it imports this module)


def _native_ops() -> bool:
    """Whether the op's forward tries the compiled replay (``native.ENABLED`` and ``native.COMPILED_OPS``)."""
    global _native
    if _native is None:
        from . import native

        _native = native
    return _native.ENABLED and _native.COMPILED_OPS


def _plan(query, key, value, attn_mask, options: tuple, backends: str) -> plans.Plan | None:
    """The forward plan of a dense call on CUDA tensors, or None: take the general path. The first call of a
    signature validates it as the general path would, and raises what it raises."""
    def make():
        pr = _problem(query, key, value, attn_mask, options)
        return plans.build(pr, _select(pr, backends, need_grad=False).backend, plans.token_major_strides(pr.out_shape),
                           backward=False, addresses=_addresses(query, key, value, attn_mask))

    return plans.lookup(_signature(query, key, value, attn_mask, options, backends), make)


def _backward_plan(query, key, value, attn_mask, options: tuple, backends: str, grad_out, out, lse,
                   deterministic: bool) -> plans.Plan | None:
    """The training plan of a dense call for these ``grad_out``, ``out`` and ``lse`` (their layouts are part of
    the signature), or None: take the general path. The forward's own out and lse always qualify; a grad_out
    the kernels cannot read in place (an expanded gradient of ``out.sum()``) gets a plan that copies it into
    out's layout first (``Plan.copies_dout``)."""
    signature = _signature(query, key, value, attn_mask, options, backends) + (
        grad_out.shape, grad_out.stride(), grad_out.dtype, grad_out.get_device(), out.shape, out.stride(), out.dtype,
        out.get_device(), lse.shape, lse.stride(), lse.dtype, lse.get_device(),
        (grad_out.data_ptr() | out.data_ptr() | lse.data_ptr()) % 16 == 0, deterministic)

    def make():
        pr = _problem(query, key, value, attn_mask, options)
        backend = _select(pr, backends, need_grad=True).backend
        out_strides = plans.token_major_strides(pr.out_shape)
        device = query.get_device()
        if not (tuple(out.shape) == tuple(grad_out.shape) == pr.out_shape and out.dtype == grad_out.dtype == query.dtype
                and out.get_device() == grad_out.get_device() == lse.get_device() == device
                and all(n == 1 or have == want for n, have, want in zip(out.shape, out.stride(), out_strides))
                and tuple(lse.shape) == pr.lse_shape and lse.dtype == torch.float32 and lse.is_contiguous()
                and (out.data_ptr() | lse.data_ptr()) % 16 == 0):
            return None  # out or lse are not the forward's: the general path reads any
        readable = grad_out.data_ptr() % 16 == 0 and launches.kernel_strides(
            pr.out_shape, grad_out.stride(), len(pr.batch_shape), pr.dtype.itemsize) is not None
        return plans.build(pr, backend, out_strides, backward=True,
                           dout_strides=grad_out.stride() if readable else None, deterministic=deterministic,
                           addresses=_addresses(query, key, value, attn_mask))

    return plans.lookup(signature, make)


def _problem(query, key, value, attn_mask, options) -> problem.Problem:
    """The validated Problem of a dense call, on array views of the tensors."""
    with bridge.on_stream(query.device):
        return problem.from_dense(*_arrays(query, key, value, attn_mask), arguments.from_op(options), 0)


def _stream(query: Tensor) -> int:
    # torch's current stream as a raw handle: what inductor's generated code reads, one C call where
    # torch.cuda.current_stream builds a Stream object
    return torch._C._cuda_getCurrentRawStream(query.get_device())


_empty: dict = {}  # (device, dtype) -> a tensor of no elements


def _nothing(like: Tensor) -> Tensor:
    """A tensor of no elements (the dmask of a call without a float mask): one per device and dtype, since
    nothing can be written to it."""
    key = (like.get_device(), like.dtype)
    found = _empty.get(key)
    if found is None:
        found = _empty[key] = like.new_empty(0)
    return found


# ---- dense ----------------------------------------------------------------------------------------------

@_implement("sdpa_fwd", tensors=5, eager=True)
def _sdpa_fwd(query, key, value, attn_mask, alibi_slopes, *rest, eager=False):
    """(out, lse); out is laid out token-major (``plans.token_major_strides``), as PyTorch's fused kernels
    lay out theirs. ``alibi_slopes``: float32 (..., Hq) or None. ``rest``: the option values, then ``seed``
    (an int64 CPU tensor (1,), or None without dropout) and ``backends`` (comma-separated cusdpa.Backend
    values, tried in that order). ``eager``: a plain eager call, which may reuse a kept mask summary
    (``mask_summaries``). Called by the dispatcher (compiled graphs) without a mask, on tensors that want no
    gradient, it may take the compiled replay's forward (``native.COMPILED_OPS``)."""
    options, seed, backends = rest[:-2], rest[-2], rest[-1]
    if alibi_slopes is None and query.is_cuda:
        if not eager and attn_mask is None and _native_ops() and not (query.requires_grad or key.requires_grad
                                                                       or value.requires_grad):
            got = _native.attention(query, key, value, None, seed, backends, options, False, False)
            if got is not None:
                return got
        plan = _plan(query, key, value, attn_mask, options, backends)
        if plan is not None:
            out = query.new_empty_strided(plan.out_shape, plan.out_strides)
            lse = query.new_empty_strided(plan.lse_shape, plan.lse_strides, dtype=torch.float32)
            stream = _stream(query)
            _ranged(plan.backend, "fwd", plan.run_forward, stream, query.data_ptr(), key.data_ptr(), value.data_ptr(),
                    out.data_ptr(), lse.data_ptr(), seed_of(seed, options[0]),
                    *mask_summaries.buffers(query, attn_mask, plan, stream, eager))
            return out, lse
    with bridge.on_stream(query.device):
        pr = problem.from_dense(*_arrays(query, key, value, attn_mask), arguments.from_op(options),
                                seed_of(seed, options[0]), *_arrays(alibi_slopes))
        return _forward(pr, query, backends)


def _forward(pr: problem.Problem, like: Tensor, backends: str) -> tuple[Tensor, Tensor]:
    impl = _select(pr, backends, need_grad=False)
    out = like.new_empty(pr.out_shape) if pr.varlen is not None else \
        like.new_empty_strided(pr.out_shape, plans.token_major_strides(pr.out_shape))
    lse = like.new_empty(pr.lse_shape, dtype=torch.float32)
    _ranged(impl.backend.value, "fwd", impl.forward, pr, *_arrays(out, lse))
    return out, lse


@torch.library.register_fake("cusdpa::sdpa_fwd")
def fake_forward(query, key, value, *rest):
    """(out, lse) as a dense forward lays them out, for tracing (interop.native's graph_forward too)."""
    shape = dense_out_shape(query, key, value)
    return (query.new_empty_strided(shape, plans.token_major_strides(shape)),
            query.new_empty(shape[:-1], dtype=torch.float32))


def _float_mask(attn_mask: Tensor | None) -> bool:
    return attn_mask is not None and attn_mask.dtype.is_floating_point


@_implement("sdpa_bwd", tensors=8, eager=True)
def _sdpa_bwd(grad_out, query, key, value, attn_mask, alibi_slopes, out, lse, *rest, eager=False):
    """(dq, dk, dv, dmask); dmask has attn_mask's shape for a float mask whose gradient is wanted
    (``mask_grad``) and 0 elements otherwise (an op cannot return None); the slopes get no gradient.
    ``rest``: the option values, seed, backends, deterministic, mask_grad; ``eager`` as the forward's."""
    options, seed, backends, deterministic, mask_grad = rest[:-4], rest[-4], rest[-3], rest[-2], rest[-1]
    mask_grad = mask_grad and _float_mask(attn_mask)
    if alibi_slopes is None and query.is_cuda and not mask_grad:
        plan = _backward_plan(query, key, value, attn_mask, options, backends, grad_out, out, lse, deterministic)
        if plan is not None:
            if plan.copies_dout:
                grad_out = torch.empty_like(out).copy_(grad_out)
            (sq, sk, sv), (tq, tk, tv) = plan.grad_shapes, plan.grad_strides
            dq, dk, dv = query.new_empty_strided(sq, tq), key.new_empty_strided(sk, tk), value.new_empty_strided(sv, tv)
            delta = lse.new_empty_strided(plan.lse_shape, plan.lse_strides)
            dq_accum = query.new_empty_strided((plan.dq_accum_elements,), (1,), dtype=torch.float32) \
                if plan.dq_accum_elements else None
            stream = _stream(query)
            _ranged(plan.backend, "bwd", plan.run_backward, stream, query.data_ptr(), key.data_ptr(), value.data_ptr(),
                    out.data_ptr(), grad_out.data_ptr(), lse.data_ptr(), delta.data_ptr(), dq.data_ptr(), dk.data_ptr(),
                    dv.data_ptr(), seed_of(seed, options[0]), dq_accum.data_ptr() if dq_accum is not None else 0,
                    *mask_summaries.buffers(query, attn_mask, plan, stream, eager))
            return dq, dk, dv, _nothing(query)
    grad_out = grad_out.contiguous()
    with bridge.on_stream(query.device):
        pr = problem.from_dense(*_arrays(query, key, value, attn_mask), arguments.from_op(options),
                                seed_of(seed, options[0]), *_arrays(alibi_slopes))
        grads = [query.new_empty(x.shape) for x in (query, key, value)]
        dmask = attn_mask.new_empty(attn_mask.shape) if mask_grad else query.new_empty(0)
        _backward(pr, grads + [dmask] if mask_grad else grads, grad_out, out, lse, backends, deterministic, mask_grad)
    return (*grads, dmask)


def _backward(pr: problem.Problem, grads: list[Tensor], grad_out: Tensor, out: Tensor, lse: Tensor, backends: str,
              deterministic: bool, mask_grad: bool = False) -> None:
    impl = _select(pr, backends, need_grad=True, mask_grad=mask_grad)
    _ranged(impl.backend.value, "bwd", impl.backward, pr, *_arrays(out, lse, grad_out), deterministic,
            tuple(_arrays(*grads)))


@torch.library.register_fake("cusdpa::sdpa_bwd")
def _(grad_out, query, key, value, attn_mask, *rest):
    dmask = attn_mask.new_empty(attn_mask.shape) if rest[-1] and _float_mask(attn_mask) else query.new_empty(0)
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape), dmask


# ---- variable length (packed) -----------------------------------------------------------------------------

@_implement("varlen_fwd", tensors=6)
def _varlen_fwd(query, key, value, cu_seqlens_q, cu_seqlens_k, alibi_slopes, max_seqlen_q, max_seqlen_k, *rest):
    """(out (Tq, Hq, Ev), lse (Hq, Tq)) of packed variable-length attention (cusdpa.varlen_attention)."""
    options, seed, backends = rest[:-2], rest[-2], rest[-1]
    with bridge.on_stream(query.device):
        pr = problem.from_varlen(*_arrays(query, key, value, cu_seqlens_q, cu_seqlens_k), max_seqlen_q,
                                 max_seqlen_k, arguments.from_op(options), seed_of(seed, options[0]),
                                 *_arrays(alibi_slopes))
        return _forward(pr, query, backends)


@torch.library.register_fake("cusdpa::varlen_fwd")
def _(query, key, value, *rest):
    return (query.new_empty((*query.shape[:2], value.shape[-1])),
            query.new_empty((query.shape[1], query.shape[0]), dtype=torch.float32))


@_implement("varlen_bwd", tensors=9)
def _varlen_bwd(grad_out, query, key, value, cu_seqlens_q, cu_seqlens_k, alibi_slopes, out, lse, max_seqlen_q,
                max_seqlen_k, *rest):
    """(dq, dk, dv) in the packed layout."""
    options, seed, backends, deterministic = rest[:-3], rest[-3], rest[-2], rest[-1]
    with bridge.on_stream(query.device):
        pr = problem.from_varlen(*_arrays(query, key, value, cu_seqlens_q, cu_seqlens_k), max_seqlen_q,
                                 max_seqlen_k, arguments.from_op(options), seed_of(seed, options[0]),
                                 *_arrays(alibi_slopes))
        grads = [query.new_empty(x.shape) for x in (query, key, value)]
        _backward(pr, grads, grad_out.contiguous(), out, lse, backends, deterministic)
    return tuple(grads)


@torch.library.register_fake("cusdpa::varlen_bwd")
def _(grad_out, query, key, value, *rest):
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)
