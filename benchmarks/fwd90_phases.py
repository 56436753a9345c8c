"""Where the Hopper forward's warps spend their clocks, phase by phase (kernels_cuda/phases.cuh).

    python benchmarks/fwd90_phases.py [--lengths 1024 4096] [--head-dims 64 128] [--causal no|yes|both]
                                      [--variants '' fwd90_tma_store=0 ...] [--reps 10]

For each point (B = tokens / L, H = hidden / E, bf16, flash_sweep.py's grid) and FlashConfig variant: the
output is compared with cuDNN's (relative Frobenius error) before anything is timed; the kernel is timed as
built (no clocks, GPU time from torch.profiler, against CUDNN_ATTENTION in the same process), then built with
the phase clocks and run ``--reps`` times. Printed per variant: TF/s and x cuDNN, then for an average
consumer warp per tile the clocks of each phase (and their share of its time), and the same for the
producer warp. The clocks are the SM's, so a phase's share is what to compare across variants; the marks
cost a clock read each (the clocked kernel runs a little slower than the timed one).
"""
from __future__ import annotations

import argparse
import dataclasses
import re

import cupy
import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import kernels_cuda
from benchmarks.flash_sweep import ms, precompile
from cusdpa import problem
from cusdpa.backends import flash
from cusdpa.backends.flash import config, launches, sources



def phase_header() -> tuple[dict, dict]:
    """kernels_cuda/phases.cuh's constants (PHASE_CTAS, ...) and slots (PH_TILE: 0, ...), read from its text."""
    text = kernels_cuda.source("phases.cuh")
    constants = {name: int(value) for name, value in re.findall(r"constexpr int (PHASE_\w+) = (\d+);", text)}
    slots, at = {}, 0
    for item in re.search(r"enum Phase \{(.*?)\};", text, re.S).group(1).split(","):
        name, _, value = (x.strip() for x in item.partition("="))
        at = int(value) if value else at
        slots[name] = at
        at += 1
    return constants, slots


_CONSTANTS, PH = phase_header()
PHASE_CTAS, PHASE_WARPS, PHASE_SLOTS = (_CONSTANTS[n] for n in ("PHASE_CTAS", "PHASE_WARPS", "PHASE_SLOTS"))
CONSUMER = {n: PH[f"PH_{n.upper()}"] for n in ("tile", "wait_q", "wait_k0", "turn0", "wait_k", "wait_v", "turn", "issue",
                                                "wait_s", "softmax", "wait_pv", "epilogue")}
# the producer's waits are for buffers to be released
PRODUCER = {"tile": PH["PH_TILE"], "q_free": PH["PH_WAIT_Q"], "k_free": PH["PH_WAIT_K"], "v_free": PH["PH_WAIT_V"],
            "issue": PH["PH_ISSUE"], "zero_v": PH["PH_ZERO"]}
START, END, TILES, BLOCKS = PH["PH_START"], PH["PH_END"], PH["PH_TILES"], PH["PH_BLOCKS"]


def phase_sums(pr, cfg, reps: int) -> np.ndarray:
    """The clocks of ``reps`` forwards of ``pr`` built with ``cfg`` and the phase clocks: [warp, slot]
    summed over CTAs."""
    cfg = dataclasses.replace(cfg, fwd90_phases=True)
    launches.config = lambda pr, cfg=cfg: cfg
    flash.IMPL.forward(pr)  # compiled, then the counters zeroed
    module = sources.module(launches.device(pr), "flash_fwd_sm90.cu", launches.sm90_forward_options(pr))
    cells = cupy.ndarray((PHASE_CTAS, PHASE_WARPS, PHASE_SLOTS), dtype=cupy.uint64,
                         memptr=module.get_global("cusdpa_phases"))
    cells.fill(0)
    for _ in range(reps):
        flash.IMPL.forward(pr)
    cupy.cuda.runtime.deviceSynchronize()
    return cupy.asnumpy(cells).sum(axis=0).astype(np.float64)


def report(sums: np.ndarray, warpgroups: int) -> list[str]:
    consumers = sums[4:4 * (warpgroups + 1)].sum(axis=0)
    producer = sums[0]
    lines = []
    for name, row, slots in (("consumer", consumers, CONSUMER), ("producer", producer, PRODUCER)):
        tiles, blocks = row[TILES], row[BLOCKS]
        total = sum(row[s] for s in range(PHASE_SLOTS) if s not in (TILES, BLOCKS))
        if not tiles:
            lines.append(f"  {name}: no tiles counted")
            continue
        parts = " ".join(f"{n} {row[s] / tiles:7.0f} ({100 * row[s] / total:4.1f}%)" for n, s in slots.items())
        lines.append(f"  {name} clk/tile {total / tiles:8.0f} ({blocks / tiles:.1f} blocks): {parts}; "
                     f"start+end {(row[START] + row[END]) / tiles:5.0f}")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 4096])
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--causal", choices=("both", "yes", "no"), default="no")
    ap.add_argument("--variants", nargs="+", default=[""], metavar="KNOB=VALUE,...",
                    help="FlashConfig changes to each point's default ('' is the default), as flash_sweep.py takes them")
    ap.add_argument("--tokens", type=int, default=16384)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--reps", type=int, default=10)
    args = ap.parse_args()
    chosen = launches.config
    for E in args.head_dims:
        for L in args.lengths:
            for causal in {"both": (False, True), "yes": (True,), "no": (False,)}[args.causal]:
                B, H = args.tokens // L, args.hidden // E
                q, k, v = (torch.randn(B, H, L, E, device="cuda", dtype=torch.bfloat16) for _ in range(3))
                pr = problem.from_dense(*(cupy.from_dlpack(x) for x in (q, k, v)), None,
                                        problem.Options(is_causal=causal))
                with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal).float()
                    t_cudnn = ms(lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
                flop = 4.0 * B * H * L * L * E / (2 if causal else 1)
                base = config.FlashConfig.for_problem(E, E, L, causal)
                configs = [dataclasses.replace(base, **config.knobs(spec)) for spec in args.variants]
                precompile(pr, configs + [dataclasses.replace(cfg, fwd90_phases=True) for cfg in configs])
                for spec in args.variants:
                    cfg = dataclasses.replace(base, **config.knobs(spec))
                    launches.config = lambda pr, cfg=cfg: cfg
                    head = f"E={E} L={L} causal={causal!s:5} {spec or 'default':28}"
                    try:
                        got = torch.from_dlpack(flash.IMPL.forward(pr)[0]).float()
                    except ValueError as e:  # tiles that do not fit in shared memory
                        print(f"{head} {e}")
                        continue
                    err = float((got - want).norm() / want.norm())
                    if not err < 2e-2:
                        print(f"{head} WRONG: relative error {err:.3g}")
                        continue
                    t = ms(lambda: flash.IMPL.forward(pr))
                    print(f"{head} {flop / t / 1e9:6.1f} TF/s {1e3 * t:8.1f} us x cudnn {t_cudnn / t:4.2f} "
                          f"(error {err:.1e})", flush=True)
                    for line in report(phase_sums(pr, cfg, args.reps), cfg.fwd90_warpgroups):
                        print(line, flush=True)
                launches.config = chosen


if __name__ == "__main__":
    main()
