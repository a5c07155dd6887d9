#!/usr/bin/env bash
# Shows that the kv tests bite: plants known bugs in crates/kv, one at a
# time, runs the kv test suite against each, and reports which tests caught
# it. Restores the source afterwards (even on Ctrl-C). Run from anywhere:
#   bash scripts/plant-bugs.sh
set -euo pipefail
cd "$(dirname "$0")/.."
src=crates/kv/src/block_pool.rs
backup=$(mktemp)
cp "$src" "$backup"
trap 'cp "$backup" "$src"; rm -f "$backup"' EXIT

# name | perl substitution applied to block_pool.rs
plants=(
  "skip the pin in lookup_and_pin|s/            self\.pin\(b\);\n            parent = Some/            parent = Some/"
  "publish before complete|s/if self\.blocks\[b\.index\(\)\]\.fill_epoch <= self\.quarantine\.completed\(\) \{/if true {/"
  "free a finished sequence head first|s/for &b in blocks\.iter\(\)\.rev\(\) \{/for &b in blocks.iter() {/"
  "anchor the window to the first holder's epoch|s/blk\.last_use = blk\.last_use\.max\(last_epoch\);/if blk.last_use == Epoch::ZERO { blk.last_use = last_epoch; }/"
  "reclaim every quarantined block on any completion|s/if blk\.state != BlockState::Quarantined \|\| blk\.last_use > e \{/if blk.state != BlockState::Quarantined {/"
)

status=0
for p in "${plants[@]}"; do
  name=${p%%|*}
  expr=${p#*|}
  cp "$backup" "$src"
  perl -0pi -e "$expr" "$src"
  if cmp -s "$backup" "$src"; then
    echo "PLANT DID NOT APPLY: $name"; status=1; continue
  fi
  out=$(STRATA_PROPTEST_CASES=256 cargo test -q -p strata-kv --profile ci --test kv 2>&1 || true)
  # The names listed under the last "failures:" heading.
  failed=$(awk '/^failures:$/ {n++; next} n==2 && /^    / {print $1}' <<<"$out" | tr '\n' ' ')
  if [ -n "$failed" ]; then
    echo "caught: $name -> $failed"
  else
    echo "MISSED: $name"; status=1
  fi
done
exit $status
