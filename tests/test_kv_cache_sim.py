"""The split-KV decode kernels (kernels_numba/decode.py) behind cusdpa.kv_cache_attention on Numba's CUDA
simulator: contiguous and paged caches, new tokens, several queries per sequence, causal, windows, softcap
and ALiBi, fp32 / fp16 / bf16, judged per sequence by the harness (test_kv_cache.judged); and their GPU
code compiled for sm_90 here, without a GPU. The cases run in a child process with
NUMBA_ENABLE_CUDASIM=1 (tests/simulator_child.py says why)."""
import os
import subprocess

import numpy as np
import pytest
import simulator_child

CASES = {  # name -> (paged, new tokens, queries, dtype, options)
    "contiguous_decode": (False, 1, 1, "float32", dict(is_causal=True)),
    "paged_prefill_chunk": (True, 3, 3, "float32", dict(is_causal=True)),
    "paged_window": (True, 2, 2, "float16", dict(is_causal=True, window=(5, 0))),
    "contiguous_not_causal_softcap_alibi": (False, 0, 2, "float32", dict(softcap=2.0, alibi=True)),
    "bf16_paged": (True, 1, 1, "bfloat16", dict(is_causal=True)),
}


def _run_case(name_seed):
    import zlib

    import test_kv_cache as t

    import cusdpa
    from cusdpa import kv_cache

    name, seed = name_seed
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    paged, new, lq, dtype, options = CASES[name]
    np_dtype = np.dtype(dtype) if dtype != "bfloat16" else np.dtype(__import__("ml_dtypes").bfloat16)
    k_cache, v_cache, table = t._caches(rng, paged)
    k_cache, v_cache = k_cache.astype(np_dtype), v_cache.astype(np_dtype)
    q = rng.standard_normal((t.B, lq, t.HQ, t.E)).astype(np_dtype)
    key, value = ((rng.standard_normal((t.B, new, t.HKV, d)).astype(np_dtype) for d in (t.E, t.EV))
                  if new else (None, None))
    seqlens = np.array([5, 0, 17], np.int32)
    batch_idx = None if paged else np.array([2, 0, 3], np.int32)
    kw = dict(options)
    if kw.pop("alibi", False):
        kw["alibi_slopes"] = (rng.random((t.B, t.HQ)) / 2).astype(np.float32)
    if not kv_cache._decode_kernels(np, q, k_cache, v_cache):
        return name, ["the decode kernels did not take the call"]
    out, lse = cusdpa.kv_cache_attention(q, k_cache, v_cache, seqlens, key, value, block_table=table,
                                         cache_batch_idx=batch_idx, return_lse=True, **kw)
    rows = np.arange(t.B) if batch_idx is None else batch_idx
    want_shape = (t.B, lq, t.HQ, t.EV)
    if out.dtype != np_dtype or out.shape != want_shape:
        return name, [f"out is {out.dtype} {out.shape}, want {np_dtype} {want_shape}"]
    return name, t.judged(q, k_cache, v_cache, seqlens + new, table, rows, out, lse, **kw)


@pytest.mark.parametrize("name", list(CASES))
def test_on_the_simulator(name, simulator_results):
    simulator_child.assert_passed(simulator_results, name)


@pytest.mark.parametrize("bf16, paged, causal, softcap, alibi", [(False, False, True, False, False),
                                                                (True, True, True, True, True),
                                                                (False, True, False, False, True)])
def test_decode_kernels_compile_for_sm90(bf16, paged, causal, softcap, alibi, monkeypatch):
    """The GPU path of the decode kernels compiles to sm_90 PTX here, and ptxas assembles it."""
    import shutil
    import types

    from cusdpa import environment

    if environment.simulator_enabled():
        pytest.skip("this pytest process runs with NUMBA_ENABLE_CUDASIM=1")
    import numba.cuda.dispatcher
    from numba import cuda
    from numba import types as nt

    from kernels_numba import decode

    monkeypatch.setattr(numba.cuda.dispatcher, "get_current_device",
                        lambda: types.SimpleNamespace(compute_capability=(9, 0)))
    element = nt.uint16 if bf16 else nt.float16
    a4, i32_2, i32_1 = nt.Array(element, 4, "A"), nt.Array(nt.int32, 2, "A"), nt.Array(nt.int32, 1, "A")
    f32 = [nt.Array(nt.float32, n, "A") for n in (2, 5, 4, 4)]
    i, f = nt.int64, nt.float32
    sig = (a4, a4, a4, i32_2, i32_1, i32_1, *f32) + (i,) * 7 + (f, f, i, i)
    kernel = decode.partial_kernel(bf16, paged, causal, softcap, alibi)
    ptx, _ = cuda.compile_ptx(kernel.py_func, sig, cc=(9, 0))
    combine, _ = cuda.compile_ptx(decode.combine.py_func, (nt.Array(nt.float32, 5, "A"), nt.Array(nt.float32, 4, "A"),
                                                          nt.Array(nt.float32, 4, "A"), nt.Array(nt.float32, 4, "A"),
                                                          nt.Array(nt.float32, 3, "A"), i, i, i), cc=(9, 0))
    ptxas = shutil.which("ptxas")
    for name, code in (("partial", ptx), ("combine", combine)):
        assert ".target sm_90" in code
        if ptxas:
            path = os.path.join(os.environ.get("TMPDIR", "/tmp"), f"cusdpa_decode_{name}.ptx")
            with open(path, "w") as fh:
                fh.write(code)
            proc = subprocess.run([ptxas, "-arch=sm_90", path, "-o", os.devnull], capture_output=True, text=True)
            os.remove(path)
            assert proc.returncode == 0, proc.stderr[-2000:]


if __name__ == "__main__":
    simulator_child.serve(_run_case, list(CASES))
