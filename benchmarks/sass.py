"""The SASS of the Hopper forward and of the decode kernel, built here with nvcc (no GPU): each build's
registers, spills and instruction count, and with ``--against`` which builds changed since an earlier run.

    python benchmarks/sass.py OUT [--knobs fwd90_stages=3,...] [--decode DEPTH=2 ...] [--against DIR]

Builds bf16 modules of the configurations ``FlashConfig.for_problem`` gives a few problems (E = 32, 64, 128,
192 / 128 and 256, causal and not, short and long, a bool mask) and of flash_decode.cu (E = 40, 64, 128,
192 / 128, 256; contiguous and paged), with ``--knobs`` applied to every forward configuration (as
``flash_sweep.py --variants`` spells them) and ``--decode`` setting cusdpa/backends/flash/decode.py's constants.
Into OUT go each build's source, cubin and SASS. ``--against DIR`` (an earlier OUT) says per build whether its
SASS is the same text, the same opcodes in another order or with other registers, or different: how a change
that should keep a kernel's instructions (a knob's default side, a deletion) is checked without a GPU.
nvdisasm comes from the pip package nvidia-cuda-nvdisasm (``pip download --no-deps nvidia-cuda-nvdisasm`` and
unzip the wheel): on PATH or given by ``--nvdisasm``.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

from cusdpa.backends.flash import config, decode, launches, sources

FORWARD = [(64, 64, 1024, False, None), (64, 64, 1024, True, None), (128, 128, 1024, True, None),
           (128, 128, 4096, False, None), (32, 32, 1024, False, None), (256, 256, 4096, False, None),
           (128, 128, 4096, False, "bool"), (192, 128, 4096, True, None), (64, 64, 16384, False, None)]
DECODE = [(128, 128, False), (64, 64, True), (256, 256, True), (192, 128, False), (40, 40, False)]
HEADER = "#include <cuda_fp16.h>\n#include <cuda_bf16.h>\n"
KERNELS = {"flash_fwd_sm90.cu": "flash_fwd_sm90", "flash_decode.cu": "flash_decode_split"}  # each source's main one


def jobs(knobs: dict) -> list:
    """(name, source, options, arch) of every build."""
    out = []
    for E, Ev, L, causal, mask in FORWARD:
        cfg = dataclasses.replace(config.FlashConfig.for_problem(E, Ev, L, causal, mask), **knobs).fitted(E, Ev)
        options = sources.compile_options("bfloat16", E, Ev, False, cfg, mask=mask, queue=mask is not None,
                                          scheduled=launches.deals_by_schedule(cfg, False, mask is not None),
                                          tma_store=cfg.fwd90_tma_store)
        out.append((f"fwd_e{E}_{Ev}_l{L}_{'causal' if causal else 'full'}_{mask or 'nomask'}", "flash_fwd_sm90.cu",
                    options, "sm_90a"))
    for E, Ev, paged in DECODE:  # (decode.TMA_BLOCKS: where takes_tma would, pages taken as of whole blocks)
        tma = bool(decode.TMA_BLOCKS) and decode.tma_head_dims(E, Ev)
        out.append((f"decode_e{E}_{Ev}_{'paged' if paged else 'contiguous'}", "flash_decode.cu",
                    decode.compile_options("bfloat16", E, Ev, paged, False, False, tma), "sm_90"))
    return out


def build(job, out: str, nvdisasm: str) -> str:
    """Compile one job into OUT/name.{cu,cubin,sass}; its ptxas summary line."""
    name, source, options, arch = job
    path = os.path.join(out, name)
    with open(path + ".cu", "w") as f:
        f.write(HEADER + sources.kernel_source(source, options))
    r = subprocess.run(["nvcc", f"-arch={arch}", "-cubin", "-Xptxas", "-v", "-o", path + ".cubin", path + ".cu",
                        *options], capture_output=True, text=True)
    if r.returncode:
        return f"{name}: FAILED\n" + "\n".join(line for line in r.stderr.splitlines() if "error" in line)
    sass = subprocess.run([nvdisasm, "-c", path + ".cubin"], capture_output=True, text=True, check=True).stdout
    with open(path + ".sass", "w") as f:
        f.write(sass)
    # ptxas -v: "Function properties for K", its spills, then "Used N registers" of K
    kernel = KERNELS[source]
    after = r.stderr[r.stderr.index(f"Function properties for {kernel}"):]
    spills = re.search(r"(\d+) bytes spill stores", after).group(1)
    registers = re.search(r"Used (\d+) registers", after).group(1)
    top = max(int(n) for n in re.findall(r"\bR(\d+)\b", sass))  # past setmaxnreg's raise, the launch's count
    return (f"{name:36s} {registers:>3s} registers (R{top} the highest used) {spills:>4s} bytes spilled "
            f"{sass.count(';'):6d} instructions")


def opcodes(sass: str) -> list:
    return re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", sass)


def compare(name: str, out: str, against: str) -> str:
    mine, theirs = (os.path.join(d, name + ".sass") for d in (out, against))
    if not os.path.exists(theirs):
        return "not in the earlier run"
    a, b = open(mine).read(), open(theirs).read()
    if a == b:
        return "same SASS"
    if opcodes(a) == opcodes(b):
        return "same opcodes in the same order, other operands (registers)"
    if collections.Counter(opcodes(a)) == collections.Counter(opcodes(b)):
        return "same opcodes, another order"
    return f"different: {len(opcodes(b))} -> {len(opcodes(a))} instructions"


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out", help="directory for sources, cubins and SASS")
    ap.add_argument("--knobs", default="", help="FlashConfig changes for every forward build, e.g. fwd90_stages=3")
    ap.add_argument("--decode", nargs="*", default=[], metavar="NAME=INT", help="decode.py constants")
    ap.add_argument("--against", help="an earlier OUT to compare each build's SASS with")
    ap.add_argument("--nvdisasm", default=shutil.which("nvdisasm"), help="path of nvdisasm")
    args = ap.parse_args()
    if not args.nvdisasm:
        sys.exit("nvdisasm not found: pip download --no-deps nvidia-cuda-nvdisasm, unzip, pass --nvdisasm PATH")
    for item in args.decode:
        constant, value = item.split("=")
        setattr(decode, constant, int(value))
    os.makedirs(args.out, exist_ok=True)
    todo = jobs(config.knobs(args.knobs))
    with ThreadPoolExecutor(os.cpu_count()) as pool:
        lines = list(pool.map(lambda job: build(job, args.out, args.nvdisasm), todo))
    for job, line in zip(todo, lines):
        compared = args.against and "FAILED" not in line  # (a build that failed has no SASS to compare)
        print(line + (f"  | {compare(job[0], args.out, args.against)}" if compared else ""))


if __name__ == "__main__":
    main()
