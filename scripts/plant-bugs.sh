#!/usr/bin/env bash
# Shows that the tests bite: plants known bugs in crates/kv,
# crates/engine, crates/store and crates/bench, one at a time, runs that crate's tests (its unit tests and
# its one integration binary) against each, and reports which tests caught
# it. Every plant must be caught. Restores the sources afterwards (even on
# Ctrl-C). Run from anywhere:
#   bash scripts/plant-bugs.sh            # every plant
#   bash scripts/plant-bugs.sh preempt    # only plants whose name matches
set -euo pipefail
cd "$(dirname "$0")/.."
only=${1:-}

files=(
  crates/kv/src/block_pool.rs
  crates/kv/src/block_pool/writes.rs
  crates/kv/src/block_pool/release.rs
  crates/kv/src/block_pool/checks.rs
  crates/kv/src/kv_cache.rs
  crates/kv/src/tier_index.rs
  crates/kv/src/block_pool/tiers.rs
  crates/engine/src/executor.rs
  crates/engine/src/scheduler.rs
  crates/engine/src/scheduler/plan.rs
  crates/engine/src/scheduler/results.rs
  crates/engine/src/scheduler/admission.rs
  crates/engine/src/scheduler/room.rs
  crates/engine/src/scheduler/turns.rs
  crates/engine/src/scheduler/restores.rs
  crates/engine/src/tiers.rs
  crates/store/src/host.rs
  crates/store/src/ssd/mod.rs
  crates/store/src/ssd/record.rs
  crates/bench/src/stats.rs
  crates/bench/src/sse.rs
  crates/bench/src/client.rs
  crates/bench/src/arrivals.rs
  crates/bench/src/run.rs
)
backup=$(mktemp -d)
for f in "${files[@]}"; do
  mkdir -p "$backup/$(dirname "$f")"
  cp "$f" "$backup/$f"
done
restore() {
  for f in "${files[@]}"; do cp "$backup/$f" "$f"; done
}
trap 'restore; rm -rf "$backup"' EXIT

# name | file | perl substitution (applied with -0, so it may span lines)
plants=(
  # The KV core.
  "skip the pin in lookup_and_pin|crates/kv/src/block_pool.rs|s/            self\.work \+= 1;\n            self\.pin\(b\);\n/            self.work += 1;\n/"
  "publish before complete|crates/kv/src/block_pool/writes.rs|s/if self\.blocks\[b\.index\(\)\]\.fill_epoch <= self\.quarantine\.completed\(\) \{/if true {/"
  "free a finished sequence head first|crates/kv/src/block_pool/release.rs|s/for &b in blocks\.iter\(\)\.rev\(\) \{/for &b in blocks.iter() {/"
  "anchor the window to the first holder's epoch|crates/kv/src/block_pool/release.rs|s/blk\.last_use = blk\.last_use\.max\(last_epoch\);/if blk.last_use == Epoch::ZERO { blk.last_use = last_epoch; }/"
  "reclaim every quarantined block on any completion|crates/kv/src/block_pool/writes.rs|s/if blk\.state != BlockState::Quarantined \|\| blk\.quarantines != n \{/if blk.state != BlockState::Quarantined {/"
  "publish under an unpublished parent|crates/kv/src/block_pool/writes.rs|s/if !self\.parent_published\(b\) \|\| self\.index/if self.index/"
  "do not taint what later steps built on a failed one|crates/kv/src/block_pool/writes.rs|s/if self\.blocks\[b\.index\(\)\]\.built_on_taint\(&self\.blocks, e\) \{/if false {/"
  "reclaim before publishing (LRU order)|crates/kv/src/block_pool/writes.rs|s/(            for &\(b, g\) in &bucket\.written \{\n                self\.publish\(b, g\);\n            \}\n)(            self\.reclaim\(e, &bucket\.released\);\n)/\$2\$1/"
  "resolve another pool's slot|crates/kv/src/block_pool/writes.rs|s/if slot\.pool != self\.id \{/if false {/"
  "let a step write into a shared block|crates/kv/src/block_pool/checks.rs|s/\} else if access == Access::Write && blk\.refcount > 1 \{/} else if false {/"
  "let a step read a failed step's block|crates/kv/src/block_pool/checks.rs|s/\} else if blk\.tainted \{\n                \"written by a failed step\"/} else if false {\n                \"written by a failed step\"/"
  "truncation keeps a failed step's blocks|crates/kv/src/block_pool/release.rs|s/            if blk\.tainted \{\n                keep = keep\.min\(i \* bs\);/            if false {\n                keep = keep.min(i * bs);/"
  "truncation keeps a cut block's generation|crates/kv/src/block_pool/release.rs|s/                blk\.unknown = 0;\n                blk\.generation\.bump\(\);/                blk.unknown = 0;/"
  "drop the rest of the release queue|crates/kv/src/kv_cache.rs|s/lock\(&self\.shared\.released\)\.pop_front\(\)/lock(\&self.shared.released).drain(..).next()/"
  "find a tier entry still landing|crates/kv/src/tier_index.rs|s/e\.state == Landing::Visible && !e\.doomed && e\.parent == parent/!e.doomed \&\& e.parent == parent/"
  "find a tier entry under another key|crates/kv/src/tier_index.rs|s/&& e\.parent == parent && e\.tokens == tokens/\&\& e.parent == parent/"
  "restore targets are not marked restoring|crates/kv/src/block_pool/tiers.rs|s/            blk\.restoring = true;/            let _ = \&blk;/; s/debug_assert!\(blk\.restoring, \"\{:\?\} was restoring\", o\.block\);//"
  "a second request restores its own copy|crates/kv/src/block_pool/tiers.rs|s/            self\.pending\.insert\(hash, \(b, generation\)\);//"
  "a failed restore keeps its tier entry|crates/kv/src/block_pool/tiers.rs|s/        let _ = self\.tier_index\.restore_failed\(failed\[0\]\.hash\);//"
  "a released holder keeps its tier pins|crates/kv/src/block_pool/release.rs|s/        self\.abandon_restores\(h\);\n        let holder = &mut self\.holders/        let holder = \&mut self.holders/"
  "write-through ignores the wear rule|crates/kv/src/block_pool/tiers.rs|s/if self\.blocks\[b\.index\(\)\]\.depth \+ 1 < min \{/if false {/"
  "write-back forgets evicted blocks|crates/kv/src/block_pool/tiers.rs|s/if self\.tier_policy\.on\(\) && self\.tier_policy\.write_back \{/if false {/"
  "evict a pinned tier entry at once|crates/kv/src/tier_index.rs|s/if e\.pins == 0 && e\.state == Landing::Visible \{/if e.state == Landing::Visible {/"
  # The engine.
  "the executor's validation always passes|crates/engine/src/executor.rs|s/rows\.iter\(\)\.try_for_each\(\|r\| g\.validate\(epoch, &r\.accesses\)\)/rows.iter().try_for_each(|_| Ok::<(), strata_kv::KvError>(()))/"
  "no accesses recorded|crates/engine/src/scheduler/plan.rs|s/let mut accesses = Vec::new\(\);\n        if self\.config\.sanitize \{/let mut accesses = Vec::new();\n        if false {/"
  "poisoning skipped|crates/engine/src/executor.rs|s/for &b in poison \{\n            self\.runner\.poison\(b\);/for \&b in poison {\n            let _ = b;/"
  "ignore a pending hit (compute a block another request is filling)|crates/engine/src/scheduler/admission.rs|s/if peek\.hit\.pending\.is_some\(\) \{/if false {/; s/if peek\.hit\.pending\.is_some\(\) \|\| /if /"
  "preempt every running request|crates/engine/src/scheduler/room.rs|s/            if gain\(g, &chosen\)\? >= short \{\n                break;\n            \}\n            chosen\.push\(giver\);/            chosen.push(giver);/; s/if gain\(g, &without\)\? >= short \{/if false {/"
  "unpin every idle session|crates/engine/src/scheduler/room.rs|s/if gain\(g, &chosen\)\? >= short \{/if gain(g, \&chosen)? >= short \&\& !matches!(giver, Giver::Session(..)) {/; s/if gain\(g, &without\)\? >= short \{/if gain(g, \&without)? >= short \&\& !matches!(chosen[k], Giver::Session(..)) {/"
  "unpin idle sessions that free nothing|crates/engine/src/scheduler/room.rs|s/if gain\(g, &without\)\? >= short \{/if false {/"
  "hand a session its lease before the overlapped step completes|crates/engine/src/scheduler/results.rs|s/\.is_some_and\(\|s\| s\.finished && s\.outstanding == 0\)/.is_some_and(|s| s.finished)/"
  "hand a session its lease without truncating it|crates/engine/src/scheduler/turns.rs|s/match g\.truncate\(&lease, upto\) \{/match Ok::<usize, strata_kv::KvError>(upto) {/"
  "ignore the blocks the step in flight gives back|crates/engine/src/scheduler/room.rs|s/self\.in_flight\.map_or\(0, \|e\| g\.returning_by\(e\)\) \+ self\.finishing/self.finishing/"
  "preempt older requests too|crates/engine/src/scheduler/room.rs|s/\.take_while\(\|&&v\| v > id\)/.filter(|\&\&v| v != id)/"
  "run the rows planned on top of a failed step|crates/engine/src/executor.rs|s/                    self\.last\.remove\(&r\.seq\);\n                    self\.doomed\.insert\(r\.seq\);/                    self.last.remove(\&r.seq);/"
  "look up and pin before deciding to admit|crates/engine/src/scheduler/admission.rs|s/let peek = g\.peek_prefix\(&seq\)\?;/let peek = g.peek_prefix(\&seq)?;\n                drop(g.lookup_and_pin(OwnerTag(id.get()), \&seq)?);/"
  "score a recomputed prompt row twice|crates/engine/src/scheduler/plan.rs|s/let from = start\.max\(s\.scored\);/let from = start;/"
  "score each row against its own token|crates/engine/src/scheduler/plan.rs|s/targets: s\.tokens\[from \+ 1\.\.=to\]\.to_vec\(\)/targets: s.tokens[from..to].to_vec()/"
  "a scored prompt takes prefix hits|crates/engine/src/scheduler/admission.rs|s/None if s\.scoring\(\) => \{/None if false => {/"
  "admit the line's front after a paused request joined it|crates/engine/src/scheduler/plan.rs|s/            self\.waiting\.retain\(\|&w\| w != id\);/            self.waiting.pop_front();/"
  "paused requests never give way|crates/engine/src/scheduler/room.rs|s/s\.waits_for_reader\(\) && self\.plannable\(s\) && !in_step/false \&\& !in_step/"
  "demotions copy out after poisoning|crates/engine/src/executor.rs|s/(        if !demotions\.is_empty\(\) \{.*?\n        \}\n)(        for &b in poison \{\n            self\.runner\.poison\(b\);\n        \}\n)/\$2\$1/s"
  "restores copy in before poisoning|crates/engine/src/executor.rs|s/(        for &b in poison \{\n            self\.runner\.poison\(b\);\n        \}\n)(        for \(b, bytes\) in restores \{\n            self\.runner\.write_block\(\*b, bytes\)\?;\n        \}\n)/\$2\$1/"
  "restores land without their bytes|crates/engine/src/executor.rs|s/            self\.runner\.write_block\(\*b, bytes\)\?;/            let _ = (b, bytes);/"
  "a restore cut short is not truncated|crates/engine/src/scheduler/restores.rs|s/if !complete && let Some\(lease\) = &s\.lease \{/if false \&\& let Some(lease) = \&s.lease {/"
  "a request is planned while its restore is read|crates/engine/src/scheduler/plan.rs|s/            if !r\.ready\(\) \{\n                return Ok\(Planned::Later\);\n            \}//"
  "a fetch serves a block of the wrong size|crates/engine/src/tiers.rs|s/match got\.filter\(\|b\| b\.len\(\) == block_bytes\)/match got.map(|mut b| { b.truncate(block_bytes \/ 2); b })/"
  # The host tier.
  "the host tier passes its bound|crates/store/src/host.rs|s/        while self\.used \+ c > self\.capacity \{/        while self.used > self.capacity {/"
  "the host tier serves another key|crates/store/src/host.rs|s/\.filter\(\|e\| e\.parent == parent && e\.tokens == tokens\)/.filter(|e| e.parent == parent)/"
  "the host tier evicts the most recent|crates/store/src/host.rs|s/self\.lru\.pop_first\(\)/self.lru.pop_last()/"
  # The SSD tier.
  "serve a block without checking its payload|crates/store/src/ssd/record.rs|s/        if blake3::hash\(payload\)\.as_bytes\(\) != &self\.sums\[i\] \{/        if false {/"
  "index a record whose write failed|crates/store/src/ssd/mod.rs|s/            let _ = self\.io\.remove\(&tmp\);\n            self\.stats\.write_failures \+= 1;\n            return Err\(e\);/            let _ = e;\n            self.stats.write_failures += 1;/"
  "keep temporary files at recovery|crates/store/src/ssd/mod.rs|s/                let _ = self\.io\.remove\(&path\);\n                r\.temporary_removed \+= 1;\n                continue;/                r.temporary_removed += 1;\n                continue;/"
  "serve another key under the hash|crates/store/src/ssd/mod.rs|s/h\.blocks\[k\]\.hash == hash && p == parent && h\.blocks\[k\]\.tokens == tokens/h.blocks[k].hash == hash \&\& p == parent/"
  # The benchmark's own logic.
  "percentiles by nearest rank|crates/bench/src/stats.rs|s/Some\(v\[lo\] \+ \(v\[hi\] - v\[lo\]\) \* \(rank - lo as f64\)\)/Some(v[rank.round() as usize])/"
  "a lone CR does not end an SSE line|crates/bench/src/sse.rs|s/b'\\\\n' \| b'\\\\r' => \{/b'\\\\n' => {/"
  "the first token is any chunk, even an empty one|crates/bench/src/client.rs|s/if let Some\(t\) = text\.filter\(\|t\| !t\.is_empty\(\)\) \{/if let Some(t) = text {/"
  "arrivals ignore the seed|crates/bench/src/arrivals.rs|s/ChaCha8Rng::seed_from_u64\(seed\)/ChaCha8Rng::seed_from_u64(0)/"
  "no bound on requests in flight|crates/bench/src/run.rs|s/let _permit = self\.permits\.acquire\(\)\.await\.ok\(\)\?;/let _permit = ();/"
  "the request cap is ignored|crates/bench/src/run.rs|s/>= self\.max_requests\b/>= usize::MAX/"
  "a chat forgets the replies it resends|crates/bench/src/run.rs|s/history\.push\(\(\"assistant\"\.into\(\), reply\)\);/let _ = reply;/"
)

status=0
for p in "${plants[@]}"; do
  name=${p%%|*}
  rest=${p#*|}
  file=${rest%%|*}
  expr=${rest#*|}
  if [ -n "$only" ] && [[ "$name" != *"$only"* ]]; then continue; fi
  restore
  perl -0pi -e "$expr" "$file"
  if cmp -s "$backup/$file" "$file"; then
    echo "PLANT DID NOT APPLY: $name"; status=1; continue
  fi
  crate=$(cut -d/ -f2 <<<"$file")
  out=$(STRATA_PROPTEST_CASES=256 STRATA_STRESS_STEPS=10000 \
    timeout 900 cargo test -q -p "strata-$crate" --profile ci --no-fail-fast --lib --test "$crate" 2>&1 || true)
  if grep -q "could not compile" <<<"$out"; then
    echo "PLANT DID NOT COMPILE: $name"; grep -m3 "^error" <<<"$out"; status=1; continue
  fi
  # The names listed under every second "failures:" heading (each failing
  # test binary prints its details under the first, then the plain list).
  failed=$(awk '/^failures:$/ {n++; list = (n % 2 == 0); next}
    list && /^    [^ ]/ {print $1} list && /^$/ {list = 0}' <<<"$out" | sort -u | tr '\n' ' ')
  if [ -n "$failed" ]; then
    echo "caught: $name -> $failed"
  elif ! grep -q "^test result:" <<<"$(tail -5 <<<"$out")"; then
    echo "HUNG (timed out, counted as missed): $name"; status=1
  else
    echo "MISSED: $name"; status=1
  fi
done
exit $status
