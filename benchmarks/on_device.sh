#!/usr/bin/env bash
# One call of the lent GPU machine: set up, then run the named stages in order, logged to $OUT/log.txt
# (sanitize adds its four reports), each stage's tail also on screen.
#
#   bash benchmarks/on_device.sh [-j] STAGE...     (from the repository root, with .whl and .kcache carried)
#
# STAGE_TIMEOUT=SECONDS stops a stage that runs longer (rc 124), so a call of the lent machine ends within
# its limit with every log written. With -j the stages run concurrently (tests and sanitizer runs are mostly compilation on the host's 16 cores;
# never for timing stages), then their logs follow one another.
#
# The machine has torch, CuPy, numba-cuda and triton but numpy 2.5, which numba-cuda 0.30 cannot import:
# a numpy < 2.5 wheel travels in .whl (README of the device tool) and goes first on PYTHONPATH.
# Stages: pending-tests (the GPU tests changed since their last run: EFFICIENT's compile-once test, a compiled
# function through graph_forward, decode's merge in batches), flash-tests, plans-tests, native-tests (the compiled replay, interop.native, against the Python path's
# bits, and a compiled function through the library's graph_forward; overhead times it), interop-tests, efficient-tests, efficient-knob-tests, efficient-short (EFFICIENT at L = 1024, through
# Numba's dispatcher and through prepared launches), efficient-fp32 (the EFFICIENT issue's fp32 shape at head dims 64, 96 and 128; efficient-fp32-tiles: the portable kernels' register tiles swept there;
# efficient-fp32-fused: the fused backward's GPU tests, then fp32 at head dims 64, 96 and 128 (Hq * E = 1536) with
# the backward fused (the default; at 128 on column parts) and not (fused_backward_head_dim=0);
# efficient-fp32-split: there, the fp32 loops splitting tiles that landed finite in 4 instructions,
# KernelConfig.tensor_core_fp32_fast_split, its GPU test then off and on; efficient-shared-scores: the fp32 shape
# at head dim 128, column parts splitting their score products across the pair (KernelConfig.tensor_core_shared_scores),
# its GPU test then off and on; efficient-fp32-knobs: both tests, then the fp32 shape at head dims 64 and 128 with
# neither, each and both (the default since they were measured) of those two knobs; efficient-dynamic: the dk/dv loops' steps of 32 queries in dynamic shared memory
# (KernelConfig.tensor_core_dynamic_smem, on since the H200 measured it at fp32 128 and bf16 fused 128): its GPU
# test, then the fp32 shape at head dims 96 and 128 off and on, and bf16 L = 4096 head dim 128 unfused (the
# default) against fused with it (fused_backward_head_dim=128); efficient-fp32-regs: there, the 3xTF32 loops at 168 registers and at 255, two blocks per SM, where their spills
# fall from 40-348 bytes to 0-124), efficient-wide-tests / efficient-wide (head dims 160-256 on the tensor_core loops, forward and backward: their GPU test / E = 192, 256 timed with KernelConfig.tensor_core_head_dim 128 and 256), efficient-fused (the fused tensor_core backward: its GPU tests, then bf16 L = 4096 timed with it never and at every head dim up to 128; the default fuses up to 64),
# efficient-fwd-tiles (the tensor_core forward at E = 128 with 32-key tiles against the default 64),
# efficient-grid-order (the tensor_core kernels' blocks head-major, KernelConfig.head_major_grid, off and on at
# L = 1024 and 4096), efficient-masks-tests / efficient-masks
# (the mask tiles' GPU test / bool and float masks of the masks issue, bf16 L = 4096, against EFFICIENT_ATTENTION given
# the same mask, with the mask tiles, KernelConfig.tensor_core_mask_tiles, off (the default), then on; each process
# about 200 s: run the tests side by side first, with -j), efficient-mask-sums-tests / efficient-mask-sums (a float
# mask broadcast over batch, heads or queries: its gradient added into fp32 sums by the tensor_core dq kernel,
# KernelConfig.tensor_core_mask_grad_sum: its GPU test / the (1, H, L, S) float mask of efficient-masks with it on,
# where the portable kernels gave 1.0 TFLOP/s on the H100),
# efficient-ab (benchmarks/ab_loops.sh: each variant of ab/, carried, timed at bf16 L = 4096 E = 64 and 128 with
# each mask of AB_MASKS, default bool float none; about 40 s a variant and mask; efficient-fp32-ab: each variant at
# the fp32 shape, head dims 64, 96 and 128, Hq * E = 1536), efficient-dkdv-blocks (bf16 L = 4096 E = 128, unmasked
# and with a bool mask, the 16-bit dk/dv loop at 168 registers and at 255 (its default since measured), two blocks an
# SM, KernelConfig.tensor_core_dkdv_blocks 0 and 2, alternated twice; efficient-dq-blocks: the same for the dq loop,
# tensor_core_dq_blocks),
# efficient-fp32-tc (fp32 on the tensor_core loops,
# three TF32 products: its GPU tests, then the fp32 shape timed with KernelConfig.tensor_core_fp32 off and on), efficient-ncu-fwd (the tensor_core forward at L = 1024
# E = 128 under ncu, heads fastest and head-major: its DRAM throughput says whether K and V came from DRAM), efficient-ncu (the tensor_core
# backward's dq and dk/dv kernels under ncu, bf16 E = 128 L = 4096; efficient-ncu-fp32: the same kernels at the
# EFFICIENT issue's fp32 shape, E = 64 L = 2048, its backward 0.68x PyTorch's on the H200; efficient-ncu-fwd-fp32: the forward there at E = 128, 0.73x PyTorch's; efficient-blocks: the tensor_core loops at three blocks an SM (168 registers, the default) and four (128):
# fp32 at head dims 96 and 128, bf16 L = 1024 E = 128, whose 1024 blocks are 2.6 waves at three and 1.9 at four), decode-tests (the KV cache on the GPU), fidelity-tests (PyTorch's behaviours, non-finite
# inputs, the flash-attention slot, Hugging Face models), fuzz (60 s of random cases against the
# reference), sanitize (every kernel family under compute-sanitizer's four tools; SANITIZE_ONLY=TEXT: the cases
# whose name holds it (A|B: either text), SANITIZE_TOOLS: some of the tools, RACECHECK_REPORT=hazard: each hazard, not the races), sweep, sweep-module (the
# tutorial module's attention shape), hopper-fwd (the Hopper forward issue's points against cuDNN: the grid
# in bf16 and fp16, head dims, the tutorial's call, GQA 32/8, long context), fwd-short-tests / fwd-short (the Hopper
# forward's choices for short problems: O stored by TMA, FlashConfig.fwd90_tma_store, and a third K/V stage: their GPU
# tests / each timed against the default at L = 1024 and on the tutorial's call), fwd-deeper (E = 128 L = 1024 not
# causal with shorter key blocks and so a third or fourth K/V stage beside O's staging buffer: 96-key blocks in 3
# stages fit 208 KB, 64-key blocks in 4 stages 192, where 128-key blocks fit only 2), fwd-phases (where the Hopper forward's warps spend their
# clocks, phase by phase: benchmarks/fwd90_phases.py, the default and with register stores, E = 128; fwd-phases-64: the
# same at E = 64, the default and a fourth K/V stage), ncu-bwd / ncu-fwd (the Hopper backward
# at E = 64 and 128, L = 4096, / the forward at E = 128 L = 1024 causal and L = 4096, E = 64 L = 4096, under ncu:
# throughput, issue rate, warp stall reasons, and the SASS lines warps wait at; benchmarks/ncu_profile.sh;
# ncu-fwd-64: the forward at E = 64 L = 4096 alone, whose softmax takes half of every consumer's clocks;
# short-causal: the tutorial module's attention, causal E = 64 L = 512 B = 32 H = 8, its phase clocks and ncu: what
# keeps the compiled module at 0.90x PyTorch's),
# fwd-wg-tests / fwd-wg (each consumer warpgroup stopping at the last key block its own rows see,
# FlashConfig.fwd90_wg_blocks: its GPU test (same bits off and on, judged by the reference) / causal E = 64 at the
# tutorial module's shape and L = 1024-4096 with it on the default tiles, on three warpgroups and on 64-key
# blocks, and E = 128 L = 1024 on 64-key blocks),
# fwd-cluster-tests / fwd-cluster (clusters of two CTAs sharing each K and V block by TMA multicast,
# FlashConfig.fwd90_cluster: its GPU test (same bits off and on, judged by the reference) / bf16 not causal, E = 128
# at L = 1024-16384 and E = 64, 256 at 4096, off and on),
# fwd-schedule-tests (the host's schedule, each tile decoded, against the round-robin deal the kernel decodes: same
# bits, judged by the reference),
# fwd-split-tests / fwd-split (a slice's last query block whose rows fill the first warpgroup only computed by every
# warpgroup on its share of the key blocks, FlashConfig.fwd90_split_last: its GPU test (judged by the reference) /
# the default against split tiles off and against the default before them (clusters, two stages; causal L = 1024:
# two warpgroups) at E = 64 L = 1024 and 4096 (at 1024 also a fourth K/V stage), the tutorial's call, causal
# E = 64 L = 4096 and 16384; then split
# tiles on two warpgroups, off by default, at E = 128 L = 1088 and 4160 (L mod 128 = 64), with clusters off too),
# fwd-idle-tests / fwd-idle (idle warpgroups skipping the last query block, FlashConfig.fwd90_skip_idle, which
# for_problem turns on where three warpgroups leave one idle at L < 2048: its GPU test (same bits off and on,
# judged by the reference) / E = 64 and 128 at L = 1024 and 4096, the tutorial's call and the tutorial module's
# attention (fp16 B = 32 H = 8 L = 512 E = 64 causal) timed with it off and on),
# overhead, hf (Hugging Face models, "cusdpa" against "sdpa"), bench (every provider),
# bench-flash (cusdpa FLASH against PyTorch's FLASH and cuDNN only), bench-module (the tutorial module: parts b
# and c), train (bf16 autocast), train-fp32, train-compiled (bf16, torch.compile), decode (greedy generation
# through the KV cache against PyTorch's SDPA over a static cache; decode-attn: the attention call alone (do_bench's times and after a clean L2) against
# PyTorch and the KV-read floor; decode-kept: the torch front end keeping the splits' workspace per stream, no
# memset launch, decode.KEEP_WORKSPACE: its GPU tests, then the attention call timed with it off and on; decode-ncu: the split kernel under ncu at B = 1 and 16; decode-phases: its warps' clocks by phase (phases.cuh) at the three shapes;
# decode-tma-blocks: the CTA's keys in blocks a producer warp loads by TMA (decode.TMA_BLOCKS): the decode GPU tests
# (its own among them), then the attention call with it off and on, twice; decode-splits:
# the attention call with at most one or two splits a sequence (cuDNN's kernel runs B = 16 as one, 128 CTAs of four
# warps, at 91% of DRAM peak on the H100), and one with a 4-deep ring (one CTA an SM); l2-requests: ncu's L2 read requests and sectors
# of the split kernel and cuDNN's at B = 1 S = 32768 and of EFFICIENT's tensor-core kernels (fp32 E = 64 L = 2048, bf16
# E = 128 L = 4096), whose tiles sit in rows padded by 16 bytes as decode's did: how many requests each copy splits into; decode-sweep: the attention call with
# the TMA ring deeper (more bytes in flight an SM: at B = 16, 128 CTAs each stream 4 MB): eight warps in three
# stages (192 KB), four in three and in four; decode-merge: the splits'
# merge loading 8, 16 or 32 partial outputs a batch, decode.MERGE_UNROLL: its GPU test, then the attention call), masks (the masks issue's shapes;
# masks-no-blocks: with the mask's block summary off; masks-per-tile: a CTA per tile, not persistent;
# masks-profile: forwards only, each masked call's GPU kernels; masks-no-steps: the backward visiting every query
# step; masks-ncu: the 90%-empty shape's forward and backward kernels under ncu),
# ring-scaling (ring attention over 1, 2, 4, 8 of the machine's GPUs, 128k and 256k tokens per GPU).
set -uo pipefail
export OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
parallel=0
if [ "${1:-}" = "-j" ]; then parallel=1; shift; fi
[ -d /tmp/site/numpy ] || python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
# CuPy's compiled kernels travel between calls (most of a test stage's time is NVRTC): each call leaves its
# cache in $OUT/cupy-cache.tgz; copied to .kcache/ here and carried (`carry: [".whl", ".kcache"]`), the next
# call starts from it. CuPy keys each entry by source, options, architecture and NVRTC version, so an entry
# from another machine image or an edited source is never taken for the current one.
export CUPY_CACHE_DIR=/tmp/cupy-cache
[ -d $CUPY_CACHE_DIR ] || { mkdir -p $CUPY_CACHE_DIR; [ -f .kcache/cupy-cache.tgz ] && tar xzf .kcache/cupy-cache.tgz -C $CUPY_CACHE_DIR; }
save_cache() {  # within the 16 MiB a returned file may hold: the newest entries that fit
  ls -t $CUPY_CACHE_DIR | head -n 400 > /tmp/cache-list
  while :; do
    tar czf "$OUT/cupy-cache.tgz" -C $CUPY_CACHE_DIR -T /tmp/cache-list 2>/dev/null
    [ "$(stat -c %s "$OUT/cupy-cache.tgz")" -le $((15 * 1024 * 1024)) ] && break
    head -n $(( $(wc -l < /tmp/cache-list) * 3 / 4 )) /tmp/cache-list > /tmp/cache-list2; mv /tmp/cache-list2 /tmp/cache-list
  done
}
trap save_cache EXIT
nvidia-smi --query-gpu=name,clocks.sm,clocks.max.sm,temperature.gpu --format=csv,noheader

# The GPU tests of KernelConfig's knobs that are off by default (efficient-knob-tests), apart from the rest
# (efficient-tests): two stages that -j runs side by side, each within a call's limit.
KNOB_TESTS="wide_heads or fused or tf32 or keys_per_tile or one_key or mask_tiles or head_major or fast_split"
KNOB_TESTS="$KNOB_TESTS or shared_scores or dynamic_shared or gradient_sums or backward_blocks"

command_of() {  # the command of stage $1, into the array cmd
  local stage=$1
  case $stage in
    flash-tests) cmd=(bash benchmarks/sharded_pytest.sh 3 -m "gpu and not slow" tests/test_flash.py
                      -k "not skipping_keeps_the_bits") ;;  # (fwd-idle-tests runs those beside it)
    plans-tests) cmd=(python3 -m pytest -q -p no:cacheprovider tests/test_plans.py) ;;
    pending-tests) cmd=(bash -c 'P="python3 -m pytest -q -m gpu -p no:cacheprovider"; rc=0  # (each runs, whatever failed)
                        $P tests/test_efficient_gpu.py -k compiles_once || rc=1
                        $P tests/test_plans.py -k library_s_forward || rc=1
                        $P tests/test_decode_gpu.py -k "merge_in_batches or decode_kernels" || rc=1; exit $rc') ;;
    native-tests) cmd=(python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_plans.py -k "compiled_replay or library_s_forward") ;;
    interop-tests) cmd=(python3 -m pytest -q -m "gpu and not slow" -p no:cacheprovider tests/test_interop_gpu.py) ;;
    # three shards side by side: one process compiling the suite's kernels ran past a call's limit
    efficient-tests) cmd=(bash benchmarks/sharded_pytest.sh 3 -m "gpu and not slow" tests/test_efficient_gpu.py
                          -k "not ($KNOB_TESTS)") ;;
    efficient-knob-tests) cmd=(bash benchmarks/sharded_pytest.sh 3 -m "gpu and not slow" tests/test_efficient_gpu.py
                               -k "$KNOB_TESTS") ;;
    fidelity-tests) cmd=(python3 -m pytest -q -m "gpu and not slow" -p no:cacheprovider tests/test_fidelity.py
                         tests/test_nonfinite.py tests/test_flash_slot.py tests/test_hf.py) ;;
    efficient-short) cmd=(bash -c 'for p in --numba-dispatch ""; do python3 benchmarks/efficient_gpu.py --L 1024 --reps 5 $p
                          done') ;;
    efficient-fp32) cmd=(python3 benchmarks/efficient_gpu.py --dtypes float32 --head-dims 64 96 128 --L 2048 --hidden 1024
                         --reps 5) ;;
    efficient-ncu-fwd) cmd=(bash -c 'for c in 0 1; do bash benchmarks/ncu_profile.sh attention_forward_tc 6 -- \
                            python3 benchmarks/efficient_gpu.py --L 1024 --reps 1 --dtypes bfloat16 --head-dims 128 \
                            --config head_major_grid=$c; done') ;;
    efficient-ncu) cmd=(bash -c 'for k in attention_dq_tc attention_dkdv_tc; do bash benchmarks/ncu_profile.sh $k 6 -- \
                        python3 benchmarks/efficient_gpu.py --L 4096 --reps 1 --dtypes bfloat16 --head-dims 128; done') ;;
    efficient-ncu-fp32) cmd=(bash -c 'for k in attention_dq_tc attention_dkdv_tc; do bash benchmarks/ncu_profile.sh $k 6 -- \
                             python3 benchmarks/efficient_gpu.py --L 2048 --hidden 1024 --reps 1 --dtypes float32 \
                             --head-dims 64; done') ;;
    efficient-ncu-fwd-fp32) cmd=(bash benchmarks/ncu_profile.sh attention_forward_tc 6 -- python3 benchmarks/efficient_gpu.py \
                                 --L 2048 --hidden 1024 --reps 1 --dtypes float32 --head-dims 128) ;;
    efficient-blocks) cmd=(bash -c 'for c in 3 4; do python3 benchmarks/efficient_gpu.py --dtypes float32 --head-dims 96 128 \
                           --L 2048 --hidden 1024 --reps 5 --config tensor_core_blocks=$c | tail -n 4; python3 \
                           benchmarks/efficient_gpu.py --dtypes bfloat16 --head-dims 128 --L 1024 --reps 7 \
                           --config tensor_core_blocks=$c | tail -n 2; done') ;;
    efficient-wide-tests) cmd=(python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_efficient_gpu.py -k wide_heads) ;;
    efficient-wide) cmd=(bash -c 'for c in 128 256; do python3 benchmarks/efficient_gpu.py --L 4096 --reps 5 --dtypes bfloat16 \
                         --head-dims 192 256 --config tensor_core_head_dim=$c | tail -n 6; done') ;;
    efficient-fp32-tc) cmd=(bash -c 'python3 -m pytest -q -m "gpu and not slow" -p no:cacheprovider tests/test_efficient_gpu.py \
                            tests/test_nonfinite.py -k "(float32 and tensor_core) or fp32 or tf32" \
                            && for c in 0 1; do python3 benchmarks/efficient_gpu.py --dtypes float32 --head-dims 64 128 \
                            --L 2048 --hidden 1024 --reps 5 --config tensor_core_fp32=$c | tail -n 6; done') ;;
    efficient-fused) cmd=(bash -c 'python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_efficient_gpu.py -k fused \
                          && for c in 0 128; do python3 benchmarks/efficient_gpu.py --L 4096 --reps 5 --dtypes bfloat16 \
                          --config fused_backward_head_dim=$c | tail -n 6; done') ;;
    efficient-fwd-tiles) cmd=(bash -c 'python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_efficient_gpu.py \
                              -k keys_per_tile && for n in 0 32; do for L in 1024 4096; do python3 benchmarks/efficient_gpu.py \
                              --L $L --reps 5 --dtypes bfloat16 --head-dims 128 --config tensor_core_block_n=$n | tail -n 3
                              done; done') ;;
    efficient-grid-order) cmd=(bash -c 'python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_efficient_gpu.py \
                               -k head_major && for c in 0 1; do for L in 1024 4096; do python3 benchmarks/efficient_gpu.py \
                               --L $L --reps 5 --dtypes bfloat16 --config head_major_grid=$c | tail -n 5; done; done') ;;
    efficient-mask-sums-tests) cmd=(python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_efficient_gpu.py -k gradient_sums) ;;
    efficient-mask-sums) cmd=(bash -c 'python3 benchmarks/efficient_gpu.py --L 4096 --reps 5 --dtypes bfloat16 --head-dims 64 128 \
                              --mask float --config tensor_core_mask_grad_sum=1 | tail -n 4') ;;
    efficient-masks-tests) cmd=(python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_efficient_gpu.py -k mask_tiles) ;;
    efficient-ab) cmd=(bash -c 'for m in ${AB_MASKS:-bool float none}; do a=; [ $m = none ] || a="--mask $m"
                       AB_TAG=$m bash benchmarks/ab_loops.sh time python3 benchmarks/efficient_gpu.py --L 4096 \
                       --reps 5 --dtypes bfloat16 --head-dims 64 128 $a; done') ;;
    efficient-fp32-ab) cmd=(bash benchmarks/ab_loops.sh time python3 benchmarks/efficient_gpu.py --dtypes float32
                            --head-dims 64 96 128 --L 2048 --hidden 1536 --reps 5) ;;
    efficient-dkdv-blocks|efficient-dq-blocks)
      local knob=tensor_core_${stage#efficient-}; knob=${knob%-blocks}_blocks
      cmd=(bash -c 'for m in none bool; do a=; [ $m = none ] || a="--mask $m"; for c in 0 2 0 2
           do python3 benchmarks/efficient_gpu.py --L 4096 --reps 5 --dtypes bfloat16 --head-dims 128 \
           $a --config '$knob'=$c | tail -n 4; done; done') ;;
    efficient-masks) cmd=(bash -c 'for t in 0 1; do for m in bool float; do python3 benchmarks/efficient_gpu.py \
                          --L 4096 --reps 5 --dtypes bfloat16 --head-dims 64 128 --mask $m \
                          --config tensor_core_mask_tiles=$t | tail -n 4; done; done') ;;
    efficient-fp32-fused) cmd=(bash -c 'python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_efficient_gpu.py \
                               -k "fused or one_key" && for f in 0 128; do python3 benchmarks/efficient_gpu.py \
                               --dtypes float32 --head-dims 64 96 128 --L 2048 --hidden 1536 --reps 5 \
                               --config fused_backward_head_dim=$f | tail -n 6; done') ;;
    efficient-fp32-split) cmd=(bash -c 'python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_efficient_gpu.py \
                               -k fast_split && for c in 0 1; do python3 benchmarks/efficient_gpu.py --dtypes float32 \
                               --head-dims 64 128 --L 2048 --hidden 1024 --reps 5 --config tensor_core_fp32_fast_split=$c \
                               | tail -n 6; done') ;;
    efficient-shared-scores) cmd=(bash -c 'python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_efficient_gpu.py \
                                  -k shared_scores && for c in 0 1; do python3 benchmarks/efficient_gpu.py --dtypes float32 \
                                  --head-dims 128 --L 2048 --hidden 1024 --reps 5 --config tensor_core_shared_scores=$c \
                                  | tail -n 6; done') ;;
    efficient-fp32-knobs) cmd=(bash -c 'python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_efficient_gpu.py \
                               -k "fast_split or shared_scores" && for c in "tensor_core_fp32_fast_split=0 \
                               tensor_core_shared_scores=0" tensor_core_shared_scores=0 tensor_core_fp32_fast_split=0 ""; do
                               echo "--- config: ${c:-default}"; python3 benchmarks/efficient_gpu.py --dtypes float32 \
                               --head-dims 64 128 --L 2048 --hidden 1024 --reps 5 --config $c | tail -n 6; done') ;;
    efficient-dynamic) cmd=(bash -c 'python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_efficient_gpu.py \
                            -k dynamic_shared || exit 1; for c in 0 1; do python3 benchmarks/efficient_gpu.py \
                            --dtypes float32 --head-dims 96 128 --L 2048 --hidden 1024 --reps 5 \
                            --config tensor_core_dynamic_smem=$c | tail -n 5; done
                            for f in 64 128; do python3 benchmarks/efficient_gpu.py --L 4096 --reps 5 --dtypes bfloat16 \
                            --head-dims 128 --config fused_backward_head_dim=$f | tail -n 3; done') ;;
    efficient-fp32-regs) cmd=(bash -c 'for c in 3 2; do python3 benchmarks/efficient_gpu.py --dtypes float32 --head-dims 64 128 \
                              --L 2048 --hidden 1024 --reps 5 --config tensor_core_blocks=$c | tail -n 6; done') ;;
    efficient-fp32-tiles) cmd=(bash -c 'for c in "sub=4" "sub=8 threads=8" "sub=6 threads=8" "sub=4 threads=8"; do
                               python3 benchmarks/efficient_gpu.py --dtypes float32 --head-dims 64 --L 2048 --hidden 1024 \
                                 --reps 5 --config $c | tail -n 4; done') ;;
    decode-tests) cmd=(python3 -m pytest -q -m "gpu and not slow" -p no:cacheprovider tests/test_decode_gpu.py
                       tests/test_interop_gpu.py tests/test_flash_attn_compat.py -k "decode or kv_cache or kvcache") ;;
    fuzz) cmd=(python3 -m cusdpa check --fuzz 60) ;;
    sanitize) cmd=(bash -c 'S="python3 benchmarks/sanitize.py --only \"${SANITIZE_ONLY:-}\""
                     eval $S > /tmp/san_plain.log 2>&1 || { tail -n 12 /tmp/san_plain.log; exit 1; }
                     tools=${SANITIZE_TOOLS:-memcheck racecheck synccheck initcheck}
                     for tool in $tools; do  # the kernels compiled once above (CuPy caches them), the tools side by side
                       # racecheck: the races its analysis finds; RACECHECK_REPORT=hazard: every hazard with its threads
                       extra=$([ $tool = racecheck ] && echo --racecheck-report ${RACECHECK_REPORT:-analysis})
                       # initcheck counts no TMA store as initialising: its forwards store O from registers
                       own=$([ $tool = initcheck ] && echo --o-from-registers)
                       eval compute-sanitizer --tool $tool $extra --report-api-errors no --error-exitcode 3 \
                         --print-limit 100000 $S $own > $OUT/sanitize_$tool.log 2>&1 &
                     done; rc=0; for j in $(jobs -p); do wait $j || rc=1; done
                     for tool in $tools; do  # per case, each report site once with its count; the log compressed
                       echo "--- $tool"; grep -E "SUMMARY" $OUT/sanitize_$tool.log | tail -n 2
                       python3 benchmarks/sanitize.py --report $OUT/sanitize_$tool.log | head -n 80
                       gzip $OUT/sanitize_$tool.log; done
                     exit $rc') ;;
    sweep) cmd=(python3 benchmarks/flash_sweep.py --forward-only --lengths 1024 4096 16384) ;;
    hopper-fwd) cmd=(bash -c 'S="python3 benchmarks/flash_sweep.py --forward-only --default-only"
                     for dt in bfloat16 float16; do $S --dtype $dt --lengths 1024 4096 16384 --head-dims 64 128; done
                     $S --lengths 4096 --head-dims 32 96 192 256
                     $S --dtype float16 --lengths 1024 --head-dims 32 --tokens 32768 --hidden 1024 --causal no
                     $S --lengths 4096 --head-dims 128 --hidden 4096 --kv-heads 8 --causal yes
                     for L in 32768 131072; do $S --lengths $L --head-dims 128 --tokens $L --causal yes; done') ;;
    sweep-module) cmd=(python3 benchmarks/flash_sweep.py --forward-only --tokens 16384 --hidden 512 --lengths 256 512 1024
                       --head-dims 64 --causal yes) ;;
    fwd-short-tests) cmd=(python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_flash.py tests/test_plans.py
                          -k "stores_o_with_tma or tma_store") ;;
    fwd-short) cmd=(bash -c 'V="\"\" fwd90_tma_store=0 fwd90_stages=3 fwd90_tma_store=1,fwd90_stages=3"
                    S="python3 benchmarks/flash_sweep.py --forward-only"
                    eval $S --lengths 1024 --head-dims 64 128 --variants $V
                    eval $S --dtype float16 --lengths 1024 --head-dims 32 --tokens 32768 --hidden 1024 --causal no \
                    --variants $V') ;;
    fwd-deeper) cmd=(bash -c 'python3 benchmarks/flash_sweep.py --forward-only --lengths 1024 --head-dims 128 --causal no \
                     --variants "" fwd90_block_n=96,fwd90_stages=3 fwd90_block_n=96,fwd90_stages=3,fwd90_tma_store=0 \
                     fwd90_block_n=64,fwd90_stages=4,fwd90_tma_store=1') ;;
    fwd-wg-tests) cmd=(python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_flash.py -k own_blocks_keep_the_bits) ;;
    fwd-wg) cmd=(bash -c 'V="\"\" fwd90_wg_blocks=1 fwd90_warpgroups=3,fwd90_skip_idle=1,fwd90_wg_blocks=1 \
                 fwd90_block_n=64,fwd90_wg_blocks=1"
                 S="python3 benchmarks/flash_sweep.py --forward-only --causal yes"
                 eval $S --dtype float16 --lengths 512 --head-dims 64 --tokens 16384 --hidden 512 --variants $V
                 eval $S --lengths 1024 2048 4096 --head-dims 64 --variants $V
                 eval $S --lengths 1024 --head-dims 128 --variants \"\" fwd90_block_n=64,fwd90_wg_blocks=1') ;;
    fwd-cluster-tests) cmd=(python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_flash.py -k clusters_sharing) ;;
    fwd-cluster) cmd=(bash -c 'S="python3 benchmarks/flash_sweep.py --forward-only --causal no --variants \"\" fwd90_cluster=2"
                      eval $S --lengths 1024 4096 16384 --head-dims 128
                      eval $S --lengths 4096 --head-dims 64 256') ;;
    fwd-idle-tests) cmd=(python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_flash.py -k skipping_keeps_the_bits) ;;
    fwd-idle) cmd=(bash -c 'V="\"\" fwd90_skip_idle=0 fwd90_skip_idle=1" \
                  && S="python3 benchmarks/flash_sweep.py --forward-only" \
                  && eval $S --lengths 1024 4096 --head-dims 64 128 --variants $V \
                  && eval $S --dtype float16 --lengths 1024 --head-dims 32 --tokens 32768 --hidden 1024 --causal no \
                  --variants $V \
                  && eval $S --dtype float16 --lengths 512 --head-dims 64 --tokens 16384 --hidden 512 --causal yes \
                  --variants $V') ;;
    fwd-split-tests) cmd=(python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_flash.py -k split_tiles) ;;
    fwd-split) cmd=(bash -c 'V="\"\" fwd90_split_last=0 fwd90_split_last=0,fwd90_cluster=2,fwd90_stages=2"
                    S="python3 benchmarks/flash_sweep.py --forward-only"
                    eval $S --lengths 1024 4096 --head-dims 64 --causal no --variants $V
                    eval $S --lengths 1024 --head-dims 64 --causal both --variants \"\" fwd90_stages=4
                    eval $S --dtype float16 --lengths 1024 --head-dims 32 --tokens 32768 --hidden 1024 --causal no \
                    --variants $V
                    eval $S --lengths 1024 --head-dims 64 --causal yes --variants \"\" \
                    fwd90_warpgroups=2,fwd90_split_last=0,fwd90_wg_blocks=0
                    eval $S --lengths 4096 16384 --head-dims 64 --causal yes --variants \"\" fwd90_split_last=0
                    eval $S --lengths 1088 4160 --head-dims 128 --variants \"\" fwd90_split_last=1 \
                    fwd90_split_last=1,fwd90_cluster=1') ;;
    fwd-schedule-tests) cmd=(python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_flash.py -k scheduled_tiles) ;;
    fwd-phases) cmd=(python3 benchmarks/fwd90_phases.py --lengths 1024 4096 --head-dims 128 --causal both
                     --variants "" fwd90_tma_store=0) ;;
    fwd-phases-64) cmd=(python3 benchmarks/fwd90_phases.py --lengths 1024 4096 --head-dims 64 --causal both
                        --variants "" fwd90_stages=4) ;;
    ncu-bwd) cmd=(bash -c 'for E in 64 128; do bash benchmarks/ncu_profile.sh flash_bwd_sm90 1 --backward-only \
                   --lengths 4096 --head-dims $E --causal no; done') ;;
    ncu-fwd) cmd=(bash -c 'for p in "128 1024 yes" "128 4096 no" "64 4096 no"; do set -- $p
                   bash benchmarks/ncu_profile.sh flash_fwd_sm90 2 --forward-only --head-dims $1 --lengths $2 --causal $3
                   done') ;;
    short-causal) cmd=(bash -c 'A="--lengths 512 --head-dims 64 --tokens 16384 --hidden 512 --causal yes"
                       python3 benchmarks/fwd90_phases.py $A
                       bash benchmarks/ncu_profile.sh flash_fwd_sm90 2 --forward-only --dtype float16 $A') ;;
    ncu-fwd-64) cmd=(bash benchmarks/ncu_profile.sh flash_fwd_sm90 2 --forward-only --head-dims 64 --lengths 4096
                     --causal no) ;;
    overhead) cmd=(python3 benchmarks/overhead.py --profile) ;;
    bench) cmd=(python3 -m cusdpa bench --out "$OUT/bench") ;;
    bench-flash) cmd=(python3 -m cusdpa bench --out "$OUT/bench" --providers cusdpa cusdpa-flash torch torch-flash
                      torch-cudnn) ;;
    bench-module) cmd=(python3 -m cusdpa bench --out "$OUT/bench" --parts b c) ;;
    hf) cmd=(python3 benchmarks/hf_models.py) ;;
    train) cmd=(python3 examples/train_gpt.py --device cuda) ;;
    train-fp32) cmd=(python3 examples/train_gpt.py --device cuda --fp32) ;;
    train-compiled) cmd=(python3 examples/train_gpt.py --device cuda --compile) ;;
    decode) cmd=(python3 examples/decode_gpt.py --device cuda) ;;
    decode-attn) cmd=(python3 benchmarks/decode.py) ;;
    decode-sweep) cmd=(bash -c 'for c in "" DEPTH=3 "WARPS=4 DEPTH=3" "WARPS=4 DEPTH=4"; do
                       echo "--- config: ${c:-default}"; python3 benchmarks/decode.py --config $c; done') ;;
    decode-merge) cmd=(bash -c 'python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_gpu.py \
                       -k merge_in_batches || exit 1; for u in 8 16 32; do echo "--- MERGE_UNROLL=$u"
                       python3 benchmarks/decode.py --config MERGE_UNROLL=$u; done') ;;
    decode-kept) cmd=(bash -c 'python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_gpu.py \
                      -k "kept or cuda_graph or one_sequence_long" \
                      && for k in 0 1; do python3 benchmarks/decode.py --profile --config KEEP_WORKSPACE=$k; done') ;;
    decode-phases) cmd=(python3 benchmarks/decode.py --phases) ;;
    decode-tma-blocks) cmd=(bash -c 'python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_decode_gpu.py || exit 1
                            for c in 0 1 0 1; do echo "--- TMA_BLOCKS=$c"; python3 benchmarks/decode.py --config TMA_BLOCKS=$c
                            done') ;;
    decode-splits) cmd=(bash -c 'for c in "" MAX_SPLITS=1 MAX_SPLITS=2 "MAX_SPLITS=1 DEPTH=4"; do
                        echo "--- config: ${c:-default}"; python3 benchmarks/decode.py --config $c | grep "^| "; done') ;;
    decode-ncu) cmd=(bash -c 'for shape in 1x32768 16x8192; do bash benchmarks/ncu_profile.sh flash_decode_split 0 -- \
                     python3 benchmarks/decode.py --shapes $shape; done') ;;
    l2-requests) cmd=(bash -c 'N="ncu --clock-control none --metrics lts__t_requests_srcunit_tex_op_read.sum,\
lts__t_sectors_srcunit_tex_op_read.sum,lts__t_sector_op_read_hit_rate.pct,gpu__time_duration.sum,\
dram__throughput.avg.pct_of_peak_sustained_elapsed,smsp__inst_executed.sum"
                      { for k in flash_decode_split flash_fprop; do
                          $N -k regex:$k --launch-skip 2 -c 1 python3 benchmarks/decode.py --shapes 1x32768; done
                        for x in "float32 --head-dims 64 --L 2048 --hidden 1024" "bfloat16 --head-dims 128 --L 4096"; do
                          $N -k regex:"attention_.*_tc" --launch-skip 18 -c 3 python3 benchmarks/efficient_gpu.py --reps 1 \
                            --dtypes $x; done; } 2>&1 | grep -a -E "^  [a-z_]|lts__|gpu__|dram__|smsp__"') ;;
    masks) cmd=(python3 benchmarks/masks.py --backward) ;;
    masks-no-blocks) cmd=(python3 benchmarks/masks.py --backward --config fwd90_mask_blocks=0) ;;
    masks-per-tile) cmd=(python3 benchmarks/masks.py --backward --config fwd90_persistent=0) ;;
    masks-profile) cmd=(python3 benchmarks/masks.py --profile) ;;
    masks-no-steps) cmd=(python3 benchmarks/masks.py --backward --config bwd90_mask_blocks=0) ;;
    masks-ncu) cmd=(bash -c 'for k in flash_fwd_sm90 flash_bwd_sm90; do
                    bash benchmarks/ncu_profile.sh $k 2 -- python3 benchmarks/masks.py --only 90% --calls 4 --backward
                    done') ;;
    ring-scaling) cmd=(bash -c 'n=$(nvidia-smi -L | wc -l); w="1"; for x in 2 4 8; do [ $x -le $n ] && w="$w $x"; done
                       python3 benchmarks/ring_scaling.py --world $w --per-rank 131072 262144') ;;
    *) echo "unknown stage $stage" >&2; exit 2 ;;
  esac
}

run_stage() {  # run stage $1, log to /tmp/$1.log, record "stage rc seconds" in /tmp/$1.rc
  local stage=$1 start rc
  start=$(date +%s)
  command_of "$stage"
  timeout "${STAGE_TIMEOUT:-3600}" "${cmd[@]}" > "/tmp/$stage.log" 2>&1
  rc=$?
  echo "$stage rc=$rc $(( $(date +%s) - start ))s" > "/tmp/$stage.rc"
}

report() {  # append stage $1's log to $OUT/log.txt and show its tail
  local stage=$1
  command_of "$stage"
  { echo "=== $stage: ${cmd[*]} ($(cat "/tmp/$stage.rc"))"; cat "/tmp/$stage.log"; } >> "$OUT/log.txt"
  echo "=== $stage: ${cmd[*]}"
  tail -n 25 "/tmp/$stage.log"
}

for stage in "$@"; do command_of "$stage"; done  # unknown stages stop here, before anything runs
if [ $parallel = 1 ]; then
  for stage in "$@"; do run_stage "$stage" & done
  wait
  for stage in "$@"; do report "$stage"; done
else
  for stage in "$@"; do run_stage "$stage"; report "$stage"; done
fi
for stage in "$@"; do cat "/tmp/$stage.rc"; done
