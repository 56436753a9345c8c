#!/usr/bin/env bash
# Kernel sources of several revisions timed in one call of the lent GPU, so that the figures share a card and a
# warm machine (the device tool's METHOD.md: compare timings only within one machine).
#
#   bash benchmarks/ab_loops.sh export NAME REV FILE...   (here) REV's versions of FILE... into ab/NAME/, by path
#   bash benchmarks/ab_loops.sh time COMMAND...           (on the device, from the repository root, carry ".whl"
#                                                          and "ab") COMMAND once per variant, each variant's files
#                                                          copied over the tree (restored between and after)
#
# ab/ is ignored by git: it travels to the device only by `carry`. Each variant's COMMAND output goes to
# $OUT/ab-NAME[-AB_TAG].log; the lines that name the GPU, the correctness verdict or a table row
# (efficient_gpu.py's) are printed, variant by variant. AB_VARIANTS orders the variants (default: every
# directory of ab/, sorted).
set -uo pipefail
verb=${1:-}; shift || true
case $verb in
  export)
    name=$1 rev=$2; shift 2
    for f in "$@"; do
      mkdir -p "ab/$name/$(dirname "$f")" && git show "$rev:$f" > "ab/$name/$f" || exit 1
    done ;;
  time)
    [ -d ab ] || { echo "no ab/ in the tree: carry it"; exit 1; }
    out=${OUT:-/tmp/out}; mkdir -p "$out"
    # the tree's own versions of every file some variant replaces, put back at the end; files the tree lacks,
    # removed then
    rm -rf /tmp/ab-orig /tmp/ab-added; mkdir -p /tmp/ab-orig; touch /tmp/ab-added
    (cd ab && find . -mindepth 2 -type f) | cut -d/ -f3- | sort -u | while read -r f; do
      if [ -f "$f" ]; then mkdir -p "/tmp/ab-orig/$(dirname "$f")" && cp "$f" "/tmp/ab-orig/$f"
      else echo "$f" >> /tmp/ab-added; fi
    done
    restore() {
      cp -r /tmp/ab-orig/. . && while read -r f; do
        rm -f "$f" && rmdir -p --ignore-fail-on-non-empty "$(dirname "$f")" 2>/dev/null
      done < /tmp/ab-added
    }
    for v in ${AB_VARIANTS:-$(ls ab)}; do
      restore && cp -r "ab/$v/." .
      echo "== $v: $*"
      log="$out/ab-$v${AB_TAG:+-$AB_TAG}.log"
      "$@" > "$log" 2>&1
      grep -aE "^GPU|correctness|^(float16|bfloat16|float32) |FAIL|Error" "$log"
    done
    restore ;;
  *) echo "usage: ab_loops.sh export NAME REV FILE... | time COMMAND..."; exit 2 ;;
esac
