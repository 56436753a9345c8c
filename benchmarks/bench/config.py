"""What ``python -m cusdpa bench`` measures: its parts, the providers compared, sizes and timing budgets."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

PARTS = {
    "a": "the tutorial's SDPA call: default dispatch and each backend (microseconds)",
    "b": "CausalSelfAttention on a dense and a nested variable-length batch (microseconds)",
    "c": "CausalSelfAttention under torch.compile (microseconds)",
    "d": "the standard grid: TFLOP/s forward and backward, ratios to each torch backend",
}


class SetupError(Exception):
    """The bench cannot start on this machine; the message says what to install or change."""


@dataclass(frozen=True)
class Provider:
    """One implementation of attention: a library and a backend in it (None: its default dispatch)."""

    id: str  # the name on the command line
    library: str  # "cusdpa" or "torch"
    backend: str | None  # cusdpa.Backend name or torch SDPBackend name

    @property
    def label(self) -> str:
        return f"{self.library} {self.backend or 'default'}"

    @property
    def is_math(self) -> bool:
        return self.backend == "MATH"


PROVIDERS = (
    Provider("cusdpa", "cusdpa", None),
    Provider("cusdpa-flash", "cusdpa", "FLASH"),
    Provider("cusdpa-efficient", "cusdpa", "EFFICIENT"),
    Provider("cusdpa-math", "cusdpa", "MATH"),
    Provider("torch", "torch", None),
    Provider("torch-flash", "torch", "FLASH_ATTENTION"),
    Provider("torch-efficient", "torch", "EFFICIENT_ATTENTION"),
    Provider("torch-cudnn", "torch", "CUDNN_ATTENTION"),
    Provider("torch-math", "torch", "MATH"),
)
BY_ID = {p.id: p for p in PROVIDERS}


@dataclass(frozen=True)
class Sizes:
    """Problem sizes of every part, and the time budget of one measurement (triton.testing.do_bench's
    warm-up and repetition times). The defaults are the tutorial's and docs/DESIGN.md's grid."""

    tutorial: tuple = (32, 32, 1024, 32)  # part a: B, H, L = S, E (fp16)
    module_heads: int = 8  # parts b, c: CausalSelfAttention with 8 heads of 64 (fp16)
    module_head_dim: int = 64
    module_batch: int = 32
    module_len: int = 512  # part b: the dense length, the longest sequence of the nested batch
    compile_len: int = 256  # part c
    lengths: tuple = (1024, 4096, 16384)  # part d: L = S
    head_dims: tuple = (64, 128)
    dtypes: tuple = ("bfloat16", "float16")
    tokens: int = 16384  # B * L
    hidden: int = 2048  # Hq * E
    warmup_ms: float = 25.0
    rep_ms: float = 100.0


PRESETS = {
    "full": Sizes(),
    # every part on the GPU, smaller: one dtype, the two shorter lengths, a fifth of the timing budget
    "quick": Sizes(lengths=(1024, 4096), dtypes=("bfloat16",), warmup_ms=5.0, rep_ms=20.0),
    # the CPU configuration: the reference, Numba's CUDA simulator and torch's CPU SDPA on toy sizes
    "tiny": Sizes(tutorial=(1, 2, 16, 16), module_heads=2, module_head_dim=8, module_batch=2, module_len=16,
                  compile_len=8, lengths=(8, 16), head_dims=(16,), dtypes=("float16",), tokens=16, hidden=16,
                  warmup_ms=1.0, rep_ms=10.0),
}


# kernels_numba.KernelConfig of EFFICIENT on Numba's CUDA simulator (the CPU configuration), where every GPU
# thread is a Python thread and every barrier a round of thread switches: one 16-row tile per head at the
# tiny sizes, 4 x 4-thread backward blocks staging 16 columns a step. The default knobs (16 x 16-thread
# blocks, 32-column steps) take about 3 s per head for a backward at L = 16 there; these take about 0.3 s.
SIMULATOR_KNOBS = dict(variant="portable", threads=4, sub=4, chunk=16)


@dataclass(frozen=True)
class Options:
    parts: tuple = tuple(PARTS)
    sizes: Sizes = PRESETS["full"]
    providers: tuple | None = None  # Provider ids; None: all in part a, the backends (no defaults) in part d
    causal: tuple = (False, True)
    directions: tuple = ("fwd", "bwd")
    out: Path = Path("bench-results")
    seed: int = 0
    # EFFICIENT's backward (fp32 FMAs, no tensor cores) takes the longest of all on long sequences
    efficient_bwd_max_len: int = 4096
    # unfused MATH materialises the B x H x L x S scores (34 GB in fp32 at L = 16384)
    math_max_len: int = 4096
    compile_backend: str = "inductor"

    def __post_init__(self):
        for name in self.parts:
            if name not in PARTS:
                raise ValueError(f"part {name!r} is not one of {', '.join(PARTS)}")
        for pid in self.providers or ():
            if pid not in BY_ID:
                raise ValueError(f"provider {pid!r} is not one of {', '.join(BY_ID)}")
        s = self.sizes
        for L in s.lengths:
            if L <= 0 or s.tokens % L:
                raise ValueError(f"length {L} must divide tokens={s.tokens} (B = tokens / L); choose lengths that "
                                 "divide --tokens")
        for E in s.head_dims:
            if E <= 0 or s.hidden % E:
                raise ValueError(f"head dim {E} must divide hidden={s.hidden} (Hq = hidden / E); choose head dims "
                                 "that divide --hidden")

    def providers_for(self, part: str) -> list[Provider]:
        if self.providers is not None:
            return [BY_ID[pid] for pid in self.providers]
        if part == "a":
            return list(PROVIDERS)
        return [p for p in PROVIDERS if p.backend is not None]

    def skip_reason(self, provider: Provider, L: int, direction: str) -> str | None:
        """Why a (provider, length, direction) is not measured by default, or None."""
        if provider.id == "cusdpa-efficient" and direction == "bwd" and L > self.efficient_bwd_max_len:
            return (f"EFFICIENT's backward is slow on long sequences; timed up to L = {self.efficient_bwd_max_len} "
                    "(--efficient-bwd-max-len)")
        if provider.is_math and L > self.math_max_len:
            return (f"unfused MATH materialises every L x S score; timed up to L = {self.math_max_len} "
                    "(--math-max-len)")
        return None

    def as_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["out"] = str(self.out)
        return d
