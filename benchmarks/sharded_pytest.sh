#!/usr/bin/env bash
# N pytest processes side by side over one selection, each running every N-th test (tests/conftest.py's --shard):
# a GPU suite whose compilation keeps one process busy past a device call's limit finishes in about 1/N of it on
# the lent machine's 16 cores. Prints each shard's summary, its failures' lines (full width) and the seed
# that replays them; fails if any shard fails.
#
#   bash benchmarks/sharded_pytest.sh N PYTEST_ARGS...
set -uo pipefail
n=$1; shift
logs=$(mktemp -d)
for ((i = 0; i < n; i++)); do
  COLUMNS=250 python3 -m pytest -q -p no:cacheprovider --shard "$i/$n" "$@" > "$logs/$i.log" 2>&1 &
done
rc=0
for job in $(jobs -p); do wait "$job" || rc=1; done
for ((i = 0; i < n; i++)); do
  echo "--- shard $i/$n"
  grep -aE "^(FAILED|ERROR)|passed|failed|error" "$logs/$i.log" | tail -n 20
  # a failure's own lines and the seed that replays it: the logs below may not come back (the device returns a
  # few files of $OUT only)
  grep -aE "^E  |cusdpa random seed" "$logs/$i.log" | head -n 40
done
[ -n "${OUT:-}" ] && cp -r "$logs" "$OUT/shards.$(basename "$logs")"  # whole logs, where returned
exit $rc
