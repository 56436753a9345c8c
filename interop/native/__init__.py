"""Plans replayed in compiled code (replay.cpp): plain eager dense calls on CUDA tensors through one C++ op,
``cusdpa_native::call``, which finds the call's plan by its signature and whose autograd Function allocates and
launches what the Python ops would (the same plans, ``cusdpa.backends.plans``), without the Python autograd
Function, the ops' bodies and their per-call Python. What stays in Python is the front end and the call's
"kind" (its options, backends and flags as a small int).

The library is built on first use with the system's C++ compiler (``CXX``, else g++, c++ or clang++) against
the headers and libraries of the installed torch, into a per-user cache (``CUSDPA_CACHE_DIR``, default
~/.cache/cusdpa), about 25 s once per torch version, and loaded with ``torch.ops.load_library``. Where it
cannot be built or loaded, calls take the Python path (``interop.autograd``) and ``reason()`` says why.

On by default (``CUSDPA_NATIVE=0`` in the environment, or ``enable(False)``, turns it off): on the H100 an eager
forward's host time went from 1.35x PyTorch's to 1.09x, a forward and backward's from 1.50x to 0.97x
(benchmarks/overhead.py). Calls it takes: no ALiBi slopes, no attn_mask whose gradient is wanted, dense (not
nested or packed), plain eager mode (``ops.plain_eager``), a plan for the forward and, where a gradient is wanted,
one for the backward, and TMA maps whose address the driver keeps at a known offset. An attn_mask's plans on
EFFICIENT read the mask through a slot; FLASH's read the mask's block summary too, whose buffers the library asks
Python for (``summary``, over ``interop.mask_summaries``, which keeps one per unchanged mask), with ``MASK_SUMMARIES``
(on; off, such plans take the Python path). Everything else, and the first call of each signature, is the Python
path's.

Compiled graphs: where Dynamo traces a call without mask, slopes, dropout or gradient, ``interop.autograd`` puts
the library's ``graph_forward`` in the graph (``graph_kind``, run once at tracing, gives the call's kind), so a
compiled module's call runs no Python once its signature's plan is bound; its first call, and calls of signatures
without a plan, take the ops' forward through ``general_forward`` (``GRAPH_FORWARD``, on: the compiled module's host
time 118-123 us -> 93-94 us on an H100, its speed with the GPU unchanged). The ops' forward as graphs that hold
it call it takes the replay's forward too (``COMPILED_OPS``).
"""
from __future__ import annotations

import functools
import hashlib
import os
import shutil
import struct
import subprocess
import tempfile
import threading
from pathlib import Path

import torch

from cusdpa import dispatch, problem
from cusdpa.backends import plans
from cusdpa.backends.launch import Launch, ZeroWords

from .. import mask_summaries, ops

SOURCE = Path(__file__).with_name("replay.cpp")
ENABLED = os.environ.get("CUSDPA_NATIVE", "1") == "1"
# FLASH's masked plans (their summary's buffers from Python) too: on the H100 a small bool-masked forward and
# backward 1.11x PyTorch's host time on the Python path, 1.00x so (BENCHMARKS.md)
MASK_SUMMARIES = True
# the forward op called by the dispatcher (compiled graphs: torch.ops.cusdpa.sdpa_fwd without a mask, on tensors
# that want no gradient) through the replay too, where its Python body cost a compiled module 13.7 us a call over
# PyTorch's (BENCHMARKS.md); on the H100 the compiled module went from 0.85x to 0.90x PyTorch's compiled speed so
COMPILED_OPS = True
# a compiled graph's inference call traced as the library's graph_forward (graph_kind), which replays its plan with
# no Python on the way: on an H100 the tutorial module compiled spent 94.2 / 92.6 us of host time a call against
# 123.0 / 118.4 through the ops' forward (two runs; PyTorch compiled 120.0 / 114.8), its time with the GPU the same
GRAPH_FORWARD = True
_state = {"loaded": None, "reason": "not built yet"}  # loaded: None (not tried), True, False
_lock = threading.Lock()
_fallbacks: dict = {}  # plan id -> the general path's backward (grad_out, q, k, v, mask, out, lse, seed)
_kept: dict = {}  # plan id -> the Python plans whose launches it replays (their modules and arrays stay alive)
# The library keeps its plans for the process's life (a backward may run long after its forward), so a
# process that keeps making new signatures stops making compiled plans past this many: the Python path's
# plans take the rest.
MAX_PLANS = 4 * plans.MAX_PLANS


def enable(on: bool = True) -> None:
    """Take (or stop taking) the compiled path for the calls it serves, from the next call on."""
    global ENABLED
    ENABLED = on


def reason() -> str:
    """Why the compiled path is not loaded ("" once it is)."""
    return _state["reason"]


def _compiler() -> str:
    """``CXX``, else the first C++ compiler on PATH of g++, c++ and clang++."""
    return os.environ.get("CXX") or next(
        (c for c in ("g++", "c++", "clang++") if shutil.which(c)), "g++")


def _compile_command(out: str) -> list[str]:
    root = Path(torch.__file__).parent
    return [_compiler(), "-O2", "-std=c++20", "-shared", "-fPIC",
            f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}", f"-I{root / 'include'}",
            f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}", str(SOURCE), "-o", out,
            f"-L{root / 'lib'}", "-lc10", "-ltorch_cpu", "-ltorch", f"-Wl,-rpath,{root / 'lib'}", "-ldl"]


def library_path() -> Path:
    """Where the library of this source, torch version and compiler lives (built or not)."""
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode()
                            + " ".join(_compile_command("x")[:1]).encode()).hexdigest()[:16]
    base = Path(os.environ.get("CUSDPA_CACHE_DIR") or Path.home() / ".cache" / "cusdpa")
    return base / "native" / f"replay-{digest}.so"


def load() -> bool:
    """Build (once) and load the library; False, with ``reason()``, where that fails."""
    if _state["loaded"] is not None:
        return _state["loaded"]
    with _lock:
        if _state["loaded"] is None:
            try:
                path = library_path()
                if not path.exists():
                    path.parent.mkdir(parents=True, exist_ok=True)
                    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".so", delete=False) as tmp:
                        pass
                    run = subprocess.run(_compile_command(tmp.name), capture_output=True, text=True)
                    if run.returncode != 0:
                        os.unlink(tmp.name)
                        raise RuntimeError(f"compiling {SOURCE.name} failed:\n{run.stderr[-3000:]}")
                    os.replace(tmp.name, path)  # whole or not at all, for processes building side by side
                torch.ops.load_library(str(path))
                # the op the library calls back for a backward its plan did not prepare
                torch.library.impl("cusdpa_native::fallback_backward", ("CPU", "CUDA"))(_fallback_backward)
                torch.library.impl("cusdpa_native::summary", ("CPU", "CUDA"))(
                    lambda query, mask, plan, stream: _summary(query, mask, plan, stream))
                # the forward compiled graphs call, and the general path it falls back to
                torch.library.register_fake("cusdpa_native::graph_forward")(ops.fake_forward)
                torch.library.impl("cusdpa_native::general_forward", ("CPU", "CUDA"))(
                    lambda query, key, value, kind: _general_forward(query, key, value, kind))
                _state.update(loaded=True, reason="")
            except Exception as e:  # noqa: BLE001 (any failure leaves the Python path, and says why)
                _state.update(loaded=False, reason=f"{type(e).__name__}: {e}")
    return _state["loaded"]


def _fallback_backward(grad_out, query, key, value, mask, out, lse, plan: int, seed: int):
    return _fallbacks[plan](grad_out, query, key, value, mask, out, lse, seed)


_graph_kinds: dict = {}  # kind -> (options, backends) of the calls compiled graphs make through graph_forward


@torch.compiler.assume_constant_result
def graph_kind(options: tuple, backends: str) -> int:
    """The kind a compiled graph's call without mask, slopes, dropout or gradient passes to the library's
    ``graph_forward``, or -1: trace the ops' forward (the library off or not loadable, or ``GRAPH_FORWARD`` off).
    Dynamo runs it once, when it traces the call, and puts its result in the graph."""
    if not (ENABLED and GRAPH_FORWARD and load()):
        return -1
    kind = _kind(options, backends, False, False)
    _graph_kinds[kind] = (options, backends)
    return kind


def _general_forward(query, key, value, kind: int):
    """A ``graph_forward`` call whose signature has no plan bound: ``attention``'s (its first call, which binds
    one where a plan is made), else the ops' forward as an eager call runs it (its kernel called directly, which
    does not ask the replay again)."""
    options, backends = _graph_kinds[kind]
    got = attention(query, key, value, None, None, backends, options, False, False)
    return got if got is not None else ops.call(ops.sdpa_fwd, query, key, value, None, None, *options, None, backends)


def _summary(query, mask, plan: int, stream: int):
    """(seen, blocks) of ``mask``'s summary for the kernels of plan ``plan``, kept while the mask is unchanged
    (a plain eager call's, as the Python path's ops keep them)."""
    return mask_summaries.tensors(query, mask, _kept[plan][0], stream, True)


# ---- plans into integers ------------------------------------------------------------------------------------

class Unencodable(Exception):
    """A plan the compiled replay cannot take (a launch of another kind, a TMA map encoded afresh per call)."""


def _signed(x: int) -> int:
    x &= 0xFFFF_FFFF_FFFF_FFFF
    return x - (1 << 64) if x >> 63 else x


def _shape(shape, strides=None) -> list[int]:
    return [len(shape), *shape, *(strides or ())]


def _launches(launches) -> list[int]:
    out = [len(launches)]
    for x in launches:
        if isinstance(x, ZeroWords):
            out += [2, x.slot, x.nbytes]
        elif isinstance(x, Launch):
            if any(tensor_map.offset is None for _, _, tensor_map in x.maps):
                raise Unencodable("a TMA map encoded afresh per call")
            out += [1, x.fn.ptr, *x.grid, x.block[0], x.smem, len(x.cells), *x.cells, len(x.maps)]
            for cell, slot, tensor_map in x.maps:
                out += [cell, slot, tensor_map.offset // 8, *struct.unpack("<16Q", tensor_map.template)]
            out += [len(x.slots)]
            for cell, slot in x.slots:
                out += [cell, slot]
        else:
            raise Unencodable(f"a launch of kind {type(x).__name__}")
    return out


def encode(forward: plans.Plan, backward: plans.Plan | None, deterministic: bool, forced: bool) -> list[int]:
    """The integers of replay.cpp's plan encoding: ``forward``'s launches, out and lse, and where a gradient is
    wanted ``backward``'s (a training plan reading dout in out's layout), summing in a fixed order
    (``deterministic``), whatever torch's deterministic mode (``forced``)."""
    if forward.summary and not MASK_SUMMARIES:
        raise Unencodable("an attn_mask's summary")
    if backward is not None and backward.summary_key != forward.summary_key:
        raise Unencodable("a backward reading another summary than its forward's")
    code = [forward.device, int(deterministic), int(forced), int(bool(forward.summary)),
            *_shape(forward.out_shape, forward.out_strides),
            *_shape(forward.lse_shape), *_launches(forward.forward)]
    if backward is None:
        code.append(0)
    else:
        code.append(1)
        for shape, strides in zip(backward.grad_shapes, backward.grad_strides):
            code += _shape(shape, strides)
        code += [backward.dq_accum_elements, *_launches(backward.backward)]
    return [_signed(x) for x in code]


def add(forward: plans.Plan, backward: plans.Plan | None, deterministic: bool, forced: bool, fallback) -> int:
    """Register a plan with the library; its id. ``fallback(grad_out, q, k, v, mask, out, lse, seed)``: the
    backward when the one prepared does not serve (torch's deterministic mode turned since the forward)."""
    pid = torch.ops.cusdpa_native.add_plan(encode(forward, backward, deterministic, forced))
    _fallbacks[pid] = fallback
    _kept[pid] = (forward, backward)
    return pid


# ---- the calls -----------------------------------------------------------------------------------------------

def _general_backward(options: tuple, backends: str, forced: bool, grad_out, query, key, value, mask, out, lse,
                      seed: int):
    seed_tensor = torch.tensor([seed], dtype=torch.int64) if options[0] > 0 else None
    dq, dk, dv, _ = ops.call(ops.sdpa_bwd, grad_out, query, key, value, mask, None, out, lse, *options, seed_tensor,
                             backends, forced or torch.are_deterministic_algorithms_enabled(), False)
    return dq, dk, dv


def _make(query, key, value, mask, options: tuple, backends: str, need_grad: bool, forced: bool):
    """The plan id of a call's signature: None where the compiled path does not take it, plans.NOT_YET where a
    later call may (EFFICIENT records its launches on the general path first). Validates as the general path
    would, raising what it raises."""
    if len(_kept) >= MAX_PLANS:
        return None
    pr = ops._problem(query, key, value, mask, options)
    out_strides = plans.token_major_strides(pr.out_shape)
    addresses = ops._addresses(query, key, value, mask)
    forward = plans.build(pr, ops._select(pr, backends, need_grad=False).backend, out_strides, backward=False,
                          addresses=addresses)
    deterministic = forced or torch.are_deterministic_algorithms_enabled()
    backward = None
    if need_grad and isinstance(forward, plans.Plan):
        backward = plans.build(pr, ops._select(pr, backends, need_grad=True).backend, out_strides, backward=True,
                               deterministic=deterministic, addresses=addresses)
    if forward is plans.NOT_YET or backward is plans.NOT_YET:
        return plans.NOT_YET
    if not isinstance(forward, plans.Plan) or (need_grad and not isinstance(backward, plans.Plan)):
        return None
    try:
        return add(forward, backward, deterministic, forced,
                   functools.partial(_general_backward, options, backends, forced))
    except Unencodable:
        return None


_WINDOW = problem.OPTION_NAMES.index("window")  # the one option the ops take as a list (unhashable)
_kinds: dict = {}  # call kind (everything of a signature but the tensors) -> its int for the library
_tries: dict = {}  # signature -> calls whose plan was not ready yet (EFFICIENT's, before its general path ran)


def _kind(options: tuple, backends: str, need_grad: bool, forced: bool) -> int:
    window = options[_WINDOW]
    if window is not None:
        options = options[:_WINDOW] + (tuple(window),) + options[_WINDOW + 1:]
    kind = (options, backends, need_grad, forced, need_grad and torch.are_deterministic_algorithms_enabled(),
            dispatch.kernel_config_key())
    found = _kinds.get(kind)
    if found is None:
        with _lock:
            found = _kinds.setdefault(kind, len(_kinds))
    return found


def attention(query, key, value, mask, seed, backends: str, options: tuple, deterministic: bool, need_grad: bool):
    """(out, lse) of a dense call without slopes on CUDA tensors through the compiled replay, or None: take the
    Python path. ``mask``: an attn_mask whose gradient is not wanted, or None. The library finds the plan by the
    call's signature; the first call of a signature builds it (``_make``) and binds it there."""
    if not ops.plain_eager((query, key, value, mask)) or not (_state["loaded"] or load()):
        return None
    forced = bool(deterministic)
    kind = _kind(options, backends, need_grad, forced)
    seed_word = _signed(ops.seed_of(seed, options[0]))
    out, lse, found = torch.ops.cusdpa_native.call(query, key, value, mask, kind, seed_word)
    if found > 0:
        return out, lse
    if found < 0:  # bound to none: the Python path's
        return None
    pid = _make(query, key, value, mask, options, backends, need_grad, forced)
    if pid is plans.NOT_YET:  # a later call tries again, a few times
        signature = ops._signature(query, key, value, mask, options, backends) + (kind,)
        with _lock:
            tries = _tries[signature] = _tries.get(signature, 0) + 1
        if tries < plans.TRIES:
            return None
        pid = None
    torch.ops.cusdpa_native.bind(kind, query, key, value, mask, -1 if pid is None else pid)
    if pid is None:
        return None
    return torch.ops.cusdpa_native.attention(query, key, value, mask, pid, seed_word)
