"""Tile shapes of the FLASH kernels: one frozen record per configuration, chosen per problem."""
from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

MAX_SMEM = 227 * 1024  # opt-in shared memory per block on sm_80 / sm_90


@dataclass(frozen=True)
class FlashConfig:
    """Tile shapes of the three kernels (see kernels_cuda/flash_*.cu). ``for_head_dims`` picks the defaults."""

    fwd_warps: int = 4
    fwd_m_tiles: int = 2  # m16 tiles per warp: 2 halves the shared-memory reads per mma
    fwd_block_n: int = 64
    bwd_warps: int = 8  # dK/dV kernel: 16 keys per warp
    bwd_block_m: int = 64  # dK/dV kernel: queries per step
    split_dkdv: bool = False  # dV then dK in two passes (registers for E > 128)
    dq_warps: int = 8
    dq_m_tiles: int = 1
    dq_block_n: int = 64
    use_wgmma: bool = True  # Hopper forward (flash_fwd_sm90.cu) where the device and head dims allow
    fwd90_warpgroups: int = 2  # consumer warpgroups, 64 query rows each
    fwd90_block_n: int = 128
    fwd90_stages: int = 2  # K and V buffers of the producer's ring
    fwd90_pingpong: bool = True  # consumer warpgroups take turns issuing their products
    fwd90_schedule: bool = True  # dense tiles dealt by the host's least-loaded schedule (else round-robin)
    # one CTA per SM walking its tiles (else a CTA per tile, balanced by the hardware as CTAs finish: for
    # tiles whose work the host cannot know, such as a mask's skipped blocks; to be measured)
    fwd90_persistent: bool = True
    # the attn_mask's block summary (kernels_cuda/mask_summary.cu) used to skip key blocks with nothing
    # attended and read no mask where every visible pair is attended (off: every block visited and read)
    fwd90_mask_blocks: bool = True
    # a packed (varlen) batch's tiles taken by the persistent forward's CTAs as they finish them (TileQueue, as a
    # masked forward's always are), not dealt round-robin: the host does not know the sequences' lengths
    # (48 sequences of 64-4096 tokens, E=128: +13% dense, +13% causal on the H200, BENCHMARKS.md)
    fwd90_queue_varlen: bool = True
    # O staged in shared memory and written by TMA stores that run on under the next tile (FlashAttention-3's
    # epilogue; dense problems only, a packed batch stores from registers): the epilogue is a per-tile cost
    # that weighs most where tiles are short. for_problem turns it on where it measured faster
    fwd90_tma_store: bool = False
    # a consumer warpgroup whose 64 rows all lie past the queries (the last query block where L is no multiple
    # of the tile's rows: 1024 = 5 x 192 + 64 leaves two of three warpgroups idle there, 11% of E <= 64's
    # products and exponentials at L = 1024) skips its products and softmax and only keeps the pipeline's
    # protocol; for_problem turns it on where such a warpgroup exists at L < 2048 (E = 64 L = 1024 +1.5%, the
    # tutorial's call +3.2% on the H100; at L = 4096, 3% idle, it measured -2%, within that run's noise)
    fwd90_skip_idle: bool = False
    # each consumer warpgroup stops at the last key block its own 64 rows see and only keeps the pipeline's
    # protocol for the tile's blocks past it: under a causal band with 192-row tiles and 128-key blocks, the
    # first warpgroup of every tile sees none of the tile's last block and the second that of every other tile,
    # so those products and exponentials are spared; with 128-row tiles only 64-key blocks leave a block unseen
    fwd90_wg_blocks: bool = False
    # a tile whose rows fill the first consumer warpgroup only (a slice's last query block: 1024 = 5 x 192 + 64)
    # computed by every warpgroup, each on its share of the key blocks, their partial outputs merged through
    # shared memory (split-KV inside the CTA), where one warpgroup would walk every block while the others idle
    # (or, with fwd90_skip_idle, wait). Not with clusters or an attn_mask (launches.sm90_forward_config)
    fwd90_split_last: bool = False
    # clusters of this many CTAs (1 or 2) share each K and V block of the Hopper forward, each CTA loading its
    # part into all of them by TMA multicast (FlashAttention-3 does so at E = 128 and 256 without a causal band):
    # half the K/V bytes read from L2. Taken only where every tile of a head reads the same key blocks (no causal
    # band, window or attn_mask, a dense batch, an even number of query blocks: launches.sm90_forward_config)
    fwd90_cluster: int = 1
    # per-warp phase clocks compiled into the Hopper forward (kernels_cuda/phases.cuh), for
    # benchmarks/fwd90_phases.py only
    fwd90_phases: bool = False
    use_wgmma_bwd: bool = True  # Hopper backward (flash_bwd_sm90.cu) where the device, head dims and options allow
    bwd90_block_m: int = 64  # the Hopper backward's step: queries per step (128 where E, Ev <= 64)
    bwd90_rotate: bool = True  # key blocks start their query loops at different blocks (full visibility)
    # the Hopper backward skips the steps whose query block the mask's block summary shows no key of the CTA's
    # block (kernels_cuda/bwd_sm90.cuh, StepWalk; not in deterministic mode). Off: every step visited, the
    # mask read where the summary shows it partial (the 90%-empty mask's backward: 3.6x faster with it on)
    bwd90_mask_blocks: bool = True
    # a float attn_mask's gradient on the Hopper backward (flash_bwd_sm90.cu, MASK_GRAD: dS stored per step,
    # summed over the mask's broadcast dims by the host), else on EFFICIENT (a learnable (1,H,L,S) bias, L=4096
    # E=128 on the H200: fwd+bwd 86 TF/s, 1.11x PyTorch, where EFFICIENT's backward gave 1)
    bwd90_mask_grad: bool = True

    @staticmethod
    @functools.cache
    def for_head_dims(E: int, Ev: int) -> "FlashConfig":
        d = max(pad16(E), pad16(Ev))
        # Tile choices measured with benchmarks/flash_sweep.py (BENCHMARKS.md): backward on the H100.
        if d <= 64:  # the Hopper backward: 128 queries per step (registers allow it), a 64-row dQ piece each
            return FlashConfig(bwd_block_m=128, dq_warps=4, bwd90_block_m=128)
        if d <= 128:  # 32 rows x 128 accumulators per warp leave room for a 32-key score block only
            return FlashConfig(fwd_block_n=32, dq_warps=4, dq_m_tiles=2, dq_block_n=32)
        return FlashConfig(fwd_m_tiles=1, fwd_block_n=32, bwd_block_m=32, split_dkdv=True, dq_block_n=32)

    @staticmethod
    @functools.cache
    def for_problem(E: int, Ev: int, L: int, causal: bool, mask: str | None = None,
                    softcap: bool = False) -> "FlashConfig":
        """``for_head_dims`` with the Hopper forward's tiles, from sweeps on the H200 (BENCHMARKS.md): 128-key
        blocks for E <= 128, with three consumer warpgroups (192 query rows) for E <= 64 (at E = 64 the
        exponentials cost as much as both products, and a third warpgroup's softmax fills the tensor
        cores' gaps: +7% at L = 1024, +17% at 4096) except short causal problems, where 192-row tiles lose
        more on the masked diagonal than they gain (-10% at L = 1024), and two for E <= 128; for larger head
        dims FlashAttention-3's key blocks, as long as registers and shared memory allow. Causal problems
        take a third K/V stage where it fits (1-3% faster: more of the next tile's loads in flight while the
        diagonal blocks are masked), and so do bool masks (the masks issue's shapes at E = 128 on the H200: 1-2%
        for a dense one, 2% for a 90%-empty one, 3-4% for key padding; a float16 mask lost 8%) and head dims up to
        32, whose blocks load in less time than a block's latency (the tutorial's call, fp16 L = 1024 E = 32:
        +1.9% in two runs). With an attn_mask (``mask``: its kind, a key of sources.MASK_CODES)
        each thread holds its scores' mask elements too (a register per pair of keys, two for float32):
        two warpgroups, and key blocks short enough that nothing spills (checked with ptxas); the backward
        keeps a bit per score of a step, which at 128 queries a step spills from E = 64 on: 64 there. With
        soft-capping (``softcap``) the backward keeps each score's 1 - tanh^2 as well: 64 queries a step
        too. Without a mask, for Ev >= 64 and L <= 4096, O leaves through shared memory by TMA stores under
        the next tile (``fwd90_tma_store``): bf16 L = 1024 E = 128 +7.6%, causal +10% (though its staging buffer
        takes the third stage), L = 4096 E = 96 and 128 +1.5-3.8%, E = 64 within 1.5%; at L = 16384 it lost
        1.6-5.8% and at E = 32 about 1%, so not there. Where three warpgroups leave one idle in the last query block at
        L < 2048, it walks its tiles without computing (``fwd90_skip_idle``: E = 64 L = 1024 +1.5%, the tutorial's
        call +3.2% on the H100). Causal problems on three warpgroups stop each warpgroup at its own last key block
        (``fwd90_wg_blocks``: E = 64 L = 2048 +3.4%, 4096 +1.3% on the H100; with two warpgroups and 128-key blocks
        no warpgroup skips a block and it cost 1.3% at L = 1024). Without a causal band or a mask, clusters of two
        CTAs share each K and V block (``fwd90_cluster``, on the H100, bf16: E = 128 L = 1024 +8.3%, 4096 +2.5%,
        16384 +2.9%; E = 64 L = 4096 +2.3%; E = 256 +0.7%), except where the last query block's rows fill one
        of three warpgroups (L mod 192 in (0, 64]): there every warpgroup takes a share of that tile's key blocks
        (``fwd90_split_last``; at L < 2048 with a third K/V stage, +1.1%), which a cluster's CTAs, walking their
        blocks in step, cannot. On the H200, bf16: E = 64 L = 1024 +5.4%, fp16 +5.6% (against clusters; clusters
        alone there lost 4%), L = 4096 +5.0% (clusters kept at 16384, where split tiles without them lost 3%);
        causal, with three warpgroups at L = 1024 too, +4.9%, fp16 +5.7%, causal L = 4096 +6.1%, 16384 +2-5%;
        E = 32 L = 4096 +4.1%, causal +7.6%; the tutorial's call +1.6%."""
        cfg = FlashConfig.for_head_dims(E, Ev)
        d = max(E, Ev)
        # the last query block of 192-row tiles holds 64 rows or fewer: it is split where measured faster
        split = d <= 64 and not mask and -(-L // 64) % 3 == 1 and (causal or L <= 4096)
        if d <= 64 and (not causal or L >= 2048 or split):
            cfg = dataclasses.replace(cfg, fwd90_warpgroups=3, fwd90_block_n=128)
        elif d <= 128:
            cfg = dataclasses.replace(cfg, fwd90_block_n=128)
        elif d <= 192:
            cfg = dataclasses.replace(cfg, fwd90_block_n=112 if Ev > 128 else 128)
        else:
            cfg = dataclasses.replace(cfg, fwd90_block_n=80)
        if mask:
            wide = mask == "float32"
            block_n = 128 if d <= 64 else (96 if wide else 128) if d <= 128 else (80 if wide else 96) if d <= 192 else 48
            cfg = dataclasses.replace(cfg, fwd90_warpgroups=2, fwd90_block_n=block_n,
                                      bwd90_block_m=cfg.bwd90_block_m if d <= 32 else 64)
        if softcap and d > 32:
            cfg = dataclasses.replace(cfg, bwd90_block_m=64)
        if split:
            cfg = dataclasses.replace(cfg, fwd90_split_last=True)
        deeper = dataclasses.replace(cfg, fwd90_stages=3)
        if (causal or mask == "bool" or d <= 32 or (split and L < 2048)) and \
                smem_bytes("fwd_sm90", deeper, E, Ev) <= MAX_SMEM:
            cfg = deeper
        if not mask and Ev >= 64 and L <= 4096:
            cfg = dataclasses.replace(cfg, fwd90_tma_store=True).fitted(E, Ev)
        if cfg.fwd90_warpgroups == 3 and L < 2048 and -(-L // 64) % 3:  # the last query block leaves one idle
            cfg = dataclasses.replace(cfg, fwd90_skip_idle=True)
        if cfg.fwd90_warpgroups == 3 and causal:  # the first warpgroup of every tile sees none of its last block
            cfg = dataclasses.replace(cfg, fwd90_wg_blocks=True)
        if not causal and not mask and not split:  # (where every query sees every key: sm90_forward_config decides)
            cfg = dataclasses.replace(cfg, fwd90_cluster=2)
        return cfg

    def fitted(self, E: int, Ev: int) -> "FlashConfig":
        """This configuration of the Hopper forward in shared memory: as it is where it fits, else with two K/V
        stages (a third given up for O's staging), else with O stored from registers (head dims past
        160), else both; then the same without the split tiles' hand-over buffer."""
        for kept in (self, dataclasses.replace(self, fwd90_split_last=False)):
            stores = dataclasses.replace(kept, fwd90_tma_store=False)
            for fitted in (kept, dataclasses.replace(kept, fwd90_stages=2), stores,
                           dataclasses.replace(stores, fwd90_stages=2)):
                if smem_bytes("fwd_sm90", fitted, E, Ev) <= MAX_SMEM:
                    return fitted
        return self  # sources.kernel refuses it, naming the shared memory it needs

    @property
    def fwd_block_m(self) -> int:
        return self.fwd_warps * 16 * self.fwd_m_tiles

    @property
    def dq_block_m(self) -> int:
        return self.dq_warps * 16 * self.dq_m_tiles

    @property
    def bwd_block_n(self) -> int:
        return self.bwd_warps * 16


def knobs(spec: str) -> dict:
    """FlashConfig changes from 'fwd90_stages=3,fwd90_pingpong=0' (the benchmarks' variants), each value of its
    field's type."""
    fields = {f.name: f.type for f in dataclasses.fields(FlashConfig)}
    out = {}
    for item in filter(None, spec.split(",")):
        name, value = item.split("=")
        out[name] = bool(int(value)) if fields[name] in ("bool", bool) else int(value)
    return out


def pad16(d: int) -> int:
    return (d + 15) // 16 * 16


def _pitches(E: int, Ev: int) -> tuple[int, int]:
    # Shared-memory row pitch (elements): padded head dim + 8, an odd number of 16-byte chunks.
    return pad16(E) + 8, pad16(Ev) + 8


def smem_bytes(kind: str, cfg: FlashConfig, E: int, Ev: int) -> int:
    """Dynamic shared memory of each kernel, as laid out in the .cu files."""
    qp, vp = _pitches(E, Ev)
    if kind == "fwd":
        bm, bn = cfg.fwd_block_m, cfg.fwd_block_n
        return 2 * (bm * max(qp, vp) + 2 * bn * qp + 2 * bn * vp)
    if kind == "fwd_sm90":  # unpadded, swizzled tiles (K and V stages, O's staging), the mbarriers, the queue
        bm, bn, st = 64 * cfg.fwd90_warpgroups, cfg.fwd90_block_n, cfg.fwd90_stages
        staged_o = bm * Ev if cfg.fwd90_tma_store else 0
        split = (cfg.fwd90_warpgroups - 1) * (Ev // 8 + 1) * 128 * 16 if cfg.fwd90_split_last else 0
        return 2 * (bm * E + st * bn * E + st * bn * Ev + staged_o) + split + 8 * (3 + 4 * st) + 8 * 5
    if kind == "bwd_sm90":  # swizzled K, V, two Q / dO stages, two dS^T and two fp32 dQ buffers, lse and D per
        bn, bm = 128, cfg.bwd90_block_m  # stage, 8 mbarriers
        if sm90_backward_is_wide(E, Ev):  # 64 keys; two P^T and two dS^T buffers, no dQ buffers
            bn = 64
            return 2 * (bn * E + bn * Ev + 2 * bm * E + 2 * bm * Ev + 4 * bn * bm) + 2 * 2 * bm * 4 + 8 * 8
        return 2 * (bn * E + bn * Ev + 2 * bm * E + 2 * bm * Ev + 2 * bn * bm) + 2 * 4 * bm * E + 2 * 2 * bm * 4 + 8 * 8
    if kind == "dkdv":
        bn, bm = cfg.bwd_block_n, cfg.bwd_block_m
        return 2 * (bn * qp + bn * vp + 2 * bm * qp + 2 * bm * vp) + 4 * 4 * bm
    if kind == "dq":
        bm, bn = cfg.dq_block_m, cfg.dq_block_n
        return 2 * (bm * qp + bm * vp + 2 * bn * qp + 2 * bn * vp)
    raise ValueError(f"kind={kind!r}")


def sm90_forward_applies(E: int, Ev: int, compute_capability: int, cfg: FlashConfig) -> bool:
    """The wgmma forward takes E, Ev multiples of 32 up to 256 on compute capability 9.0 (sm_90a
    instructions)."""
    return cfg.use_wgmma and compute_capability == 90 and all(d % 32 == 0 and 32 <= d <= 256 for d in (E, Ev))


def sm90_backward_applies(E: int, Ev: int, compute_capability: int, cfg: FlashConfig) -> bool:
    """The wgmma backward takes, on compute capability 9.0, E and Ev multiples of 32 up to 128
    (flash_bwd_sm90.cu) or from 64 to 256 with one above 128 (flash_bwd_sm90_wide.cu)."""
    if not (cfg.use_wgmma_bwd and compute_capability == 90 and E % 32 == 0 and Ev % 32 == 0):
        return False
    return all(32 <= d <= 128 for d in (E, Ev)) or all(64 <= d <= 256 for d in (E, Ev))


def sm90_backward_is_wide(E: int, Ev: int) -> bool:
    """Head dims above 128 take flash_bwd_sm90_wide.cu: 64 keys per CTA, each warpgroup part of the head dims."""
    return max(E, Ev) > 128


def sm90_wide_chunk(D: int) -> int:
    """Columns of a swizzle chunk of a head dim D's tiles in flash_bwd_sm90_wide.cu: 64 (128-byte swizzle)
    where both warpgroups' parts (half of D rounded up to 32, and the rest) are multiples of 64, else 32."""
    first = (D // 2 + 31) // 32 * 32
    return 64 if first % 64 == 0 and (D - first) % 64 == 0 else 32
