"""Time FLASH tile configurations against each other (and PyTorch's FLASH backend) on a few grid points.

    python benchmarks/flash_sweep.py [--lengths 4096] [--head-dims 64 128] [--tokens 16384] [--hidden 2048]
                                     [--forward-only | --backward-only] [--default-only] [--variants '' fwd90_stages=3 ...]

Used to choose FlashConfig.for_head_dims and for_problem (each point starts from the latter's tiles);
prints one line per (point, direction, config), best first ("bwd det": deterministic=True), with its
ratio to PyTorch's FLASH_ATTENTION and to CUDNN_ATTENTION. B = tokens / L and H = hidden / E: the defaults are docs/DESIGN.md's grid;
``--tokens 16384 --hidden 512 --lengths 512`` is the tutorial module's attention; ``--hidden 4096 --kv-heads 8
--head-dims 128 --causal yes`` grouped-query attention (32 query heads, 8 key/value heads); ``--tokens 32768
--lengths 32768 --head-dims 128`` long context (B = 1, H = 16). Each variant's output (backward: its dq,
dk and dv) is compared with PyTorch's (relative Frobenius error, ~1e-3 in bf16) before it is timed, so a broken tile
configuration shows up as an error, not as a speed.
"""
from __future__ import annotations

import argparse
import dataclasses
import multiprocessing
from concurrent.futures import ProcessPoolExecutor

import cupy
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from cusdpa import problem
from cusdpa.backends import flash
from cusdpa.backends.flash import config, launches, sources

# Forward variants are absolute (not relative to the default), so every point sees the same list.
FWD = [dict(use_wgmma=True, fwd90_warpgroups=wg, fwd90_block_n=bn)
       for wg, bn in ((2, 64), (2, 80), (2, 112), (2, 128), (2, 144), (2, 176), (3, 64), (3, 96), (3, 128))] + \
      [dict(use_wgmma=False)]
# Backward variants: the Hopper kernel, then the mma.sync kernels' dK/dV and dQ tiles.
BWD = [dict()] + [dict(use_wgmma_bwd=False, **t) for t in (
    dict(bwd_block_m=64), dict(bwd_block_m=128), dict(bwd_warps=4, bwd_block_m=64), dict(dq_warps=4),
    dict(dq_warps=4, dq_m_tiles=2, dq_block_n=32))]


def precompile(pr, configs) -> None:
    """The Hopper forward's modules of ``pr`` under each FlashConfig of ``configs``, compiled side by side in
    processes (spawned: none inherits this one's CUDA context), each into CuPy's kernel cache on disk, so that
    the runs that follow load them instead of compiling one after another (each takes seconds of NVRTC: a
    sweep's compiles were a large part of a device call). Configurations the forward would refuse (too much
    shared memory, no wgmma) are left to the run, which reports them."""
    chosen, jobs = launches.config, set()
    device = launches.device(pr)
    try:
        for cfg in configs:
            launches.config = lambda pr, cfg=cfg: cfg
            if config.sm90_forward_applies(pr.E, pr.Ev, sources.compute_capability(device), cfg):
                smem = config.smem_bytes("fwd_sm90", launches.sm90_forward_config(pr), pr.E, pr.Ev)
                if smem <= config.MAX_SMEM:
                    jobs.add((device, launches.sm90_forward_options(pr), smem))
    finally:
        launches.config = chosen
    if len(jobs) > 1:
        try:
            with ProcessPoolExecutor(len(jobs), mp_context=multiprocessing.get_context("spawn")) as pool:
                list(pool.map(_compile_forward, jobs))
        except Exception as e:  # the runs compile what is missing, one by one
            print(f"precompile: {type(e).__name__}: {e}; compiling in turn", flush=True)


def _compile_forward(job) -> None:
    device, options, smem = job
    sources.kernel(device, "flash_fwd_sm90.cu", "flash_fwd_sm90", options, smem)


def ms(fn, calls=30):
    """GPU time per call (ms): the kernels' own durations from torch.profiler, summed. At short lengths one
    call's host work (validation, dispatch, views) outlasts its kernels, so wall-clock timing of back-to-back
    calls (triton's do_bench) measures the host, the same for every tile configuration."""
    for _ in range(5):
        fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    device = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
    return sum(e.device_time for e in device) / calls / 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="+", default=[4096])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--causal", choices=("both", "yes", "no"), default="both")
    ap.add_argument("--forward-only", action="store_true")
    ap.add_argument("--backward-only", action="store_true", help="time the backward alone (its forward still runs once)")
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    ap.add_argument("--default-only", action="store_true", help="time only the tiles FlashConfig.for_problem picks")
    ap.add_argument("--variants", nargs="+", metavar="KNOB=VALUE,...",
                    help="variants instead of the built-in lists (forward and backward alike), each a comma-separated "
                         "list of FlashConfig changes to the point's default ('' is the default itself), e.g. '' "
                         "fwd90_stages=3")
    ap.add_argument("--tokens", type=int, default=16384, help="B * L")
    ap.add_argument("--hidden", type=int, default=2048, help="H * E")
    ap.add_argument("--kv-heads", type=int, help="key/value heads (grouped-query attention); default H")
    args = ap.parse_args()
    for E in args.head_dims:
        for L in args.lengths:
            for causal in {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]:
                B, H = args.tokens // L, args.hidden // E
                Hkv = args.kv_heads or H
                dtype = getattr(torch, args.dtype)
                q, do = (torch.randn(B, H, L, E, device="cuda", dtype=dtype) for _ in range(2))
                k, v = (torch.randn(B, Hkv, L, E, device="cuda", dtype=dtype) for _ in range(2))
                cq, ck, cv, cdo = (cupy.from_dlpack(x) for x in (q, k, v, do))
                flop = 4.0 * B * H * L * L * E / (2 if causal else 1)
                gqa = Hkv != H
                pr = problem.from_dense(cq, ck, cv, None, problem.Options(is_causal=causal, enable_gqa=gqa))
                qg, kg, vg = (x.detach().requires_grad_() for x in (q, k, v))

                def torch_sdpa(*qkv):
                    return torch.nn.functional.scaled_dot_product_attention(*qkv, is_causal=causal, enable_gqa=gqa)

                with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                    t_fwd = ms(lambda: torch_sdpa(q, k, v))
                    o = torch_sdpa(qg, kg, vg)
                    t_bwd = None if args.forward_only else ms(lambda: o.backward(do, retain_graph=True))
                    if not args.forward_only:
                        g_ref = [g.float() for g in torch.autograd.grad(o, (qg, kg, vg), do, retain_graph=True)]
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    t_cudnn = ms(lambda: torch_sdpa(q, k, v))
                    oc = torch_sdpa(qg, kg, vg)
                    t_cudnn_bwd = None if args.forward_only else ms(lambda: oc.backward(do, retain_graph=True))
                o_ref = o.detach().float()
                base = config.FlashConfig.for_problem(E, E, L, causal)
                rows = []
                out, lse = flash.IMPL.forward(pr)
                bwd = lambda: flash.IMPL.backward(pr, out, lse, cdo)
                runs = [("fwd", FWD, lambda: flash.IMPL.forward(pr), t_fwd, t_cudnn, 1.0),
                        ("bwd", BWD, bwd, t_bwd, t_cudnn_bwd, 2.5),
                        ("bwd det", [{}], lambda: flash.IMPL.backward(pr, out, lse, cdo, True), t_bwd, t_cudnn_bwd, 2.5)]
                if args.forward_only:
                    runs = runs[:1]
                elif args.backward_only:
                    runs = runs[1:]
                for kind, variants, fn, t_torch, t_cud, mult in runs:
                    if args.default_only or kind == "bwd det":  # deterministic: the default tiles only
                        variants = [{}]
                    elif args.variants is not None:
                        variants = [config.knobs(spec) for spec in args.variants]
                    if kind == "fwd":
                        precompile(pr, [dataclasses.replace(base, **knobs) for knobs in variants])
                    for knobs in variants:
                        cfg = dataclasses.replace(base, **knobs)
                        launches.config = lambda pr, cfg=cfg: cfg
                        try:
                            got = fn()
                            got, want = ([got[0]], [o_ref]) if kind == "fwd" else (got, g_ref)
                            err = max(float((torch.from_dlpack(g).float() - w).norm() / w.norm())
                                      for g, w in zip(got, want))
                            if not err < 2e-2:
                                print(f"E={E} L={L} causal={causal} {kind} {knobs}: WRONG, relative error {err:.3g}")
                                continue
                            rows.append((kind, cfg, ms(fn), t_torch, t_cud, mult))
                        except ValueError as e:  # tiles that do not fit in shared memory
                            print(f"E={E} {kind} {knobs}: {e}")
                launches.config = lambda pr: base
                rows.sort(key=lambda r: (r[0], r[2]))
                for kind, cfg, t, tt, tc, mult in rows:
                    knobs = {k: v for k, v in dataclasses.asdict(cfg).items() if getattr(base, k) != v}
                    cudnn = f" x cudnn {tc / t:4.2f}"
                    print(f"B={B} H={H}/{Hkv} E={E} L={L} causal={causal!s:5} {kind:10} {flop * mult / t / 1e9:6.1f} TF/s "
                          f"{1e3 * t:8.1f} us  x torch_flash {tt / t:4.2f}{cudnn}  {knobs or 'default'}", flush=True)


if __name__ == "__main__":
    main()
