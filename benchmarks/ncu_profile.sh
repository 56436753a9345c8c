#!/usr/bin/env bash
# One kernel launch under ncu (on the GPU machine, clocks as they run):
#
#   bash benchmarks/ncu_profile.sh KERNEL_REGEX SKIP SWEEP_ARGS...
#   bash benchmarks/ncu_profile.sh KERNEL_REGEX SKIP -- COMMAND...
#
# profiles the launch after the first SKIP of kernels matching KERNEL_REGEX in
# `python3 benchmarks/flash_sweep.py --default-only SWEEP_ARGS...` (or in COMMAND, such as
# `python3 benchmarks/masks.py --only 90% --calls 4 --backward`) twice: throughput, issue rate and warp
# states (ncu's details page, filtered), then stall sampling per SASS line summarised by ncu_source.py.
# (flash_sweep's own timing needs the profiler ncu holds, so its table breaks; the launch is what counts.)
set -uo pipefail
kernel=$1 skip=$2
shift 2
if [ "${1:-}" = "--" ]; then
    shift
    sweep=("$@")
else
    sweep=(python3 benchmarks/flash_sweep.py --default-only "$@")
fi
profile=(ncu --clock-control none -k "regex:$kernel" --launch-skip "$skip" -c 1)
echo "--- $kernel, ${sweep[*]}"
"${profile[@]}" --section SpeedOfLight --section SchedulerStats --section WarpStateStats --print-details all \
    "${sweep[@]}" 2>&1 | grep -a -E "^ +(Duration|.*Throughput|Issued Warp Per Scheduler|Warp Cycles Per Issued|Stall [A-Z])"
"${profile[@]}" --section WarpStateStats --section SourceCounters --page source --print-source sass --csv \
    "${sweep[@]}" > /tmp/ncu_source.csv 2>&1
python3 benchmarks/ncu_source.py /tmp/ncu_source.csv --top 25
