//! The executor on hand-built steps: the sanitizer's checks run and fail
//! the step, fresh blocks are poisoned before the forward pass, and a model
//! that returns the wrong number of logits fails the whole step.

use std::sync::{Arc, Mutex};

use strata_kv::{
    Access, BlockHasher, BlockId, Generation, KvCache, Lease, OwnerTag, PoolConfig, TokenId,
};
use strata_model::{Logits, SeqInput};

use super::{Executor, Runner, Step, StepSeq};
use crate::request::RequestId;
use crate::sanitizer::Sanitizer;

/// Records what the executor asks of it; returns one-hot logits, or fewer
/// rows than asked when `short`.
#[derive(Clone, Default)]
struct Probe {
    log: Arc<Mutex<Vec<String>>>,
    short: bool,
}

impl Runner for Probe {
    fn forward(&mut self, batch: &[SeqInput<'_>]) -> Result<Vec<Vec<f32>>, String> {
        self.log
            .lock()
            .unwrap()
            .push(format!("forward {}", batch.len()));
        let mut out: Vec<Vec<f32>> = batch
            .iter()
            .filter(|s| s.logits != Logits::None)
            .map(|s| {
                let rows = if s.logits == Logits::All {
                    s.tokens.len()
                } else {
                    1
                };
                [0.0, 1.0, 0.0].repeat(rows)
            })
            .collect();
        if self.short {
            out.pop();
        }
        Ok(out)
    }

    fn poison(&mut self, block: BlockId) {
        self.log.lock().unwrap().push(format!("poison {block:?}"));
    }

    fn block_bytes(&self) -> usize {
        1
    }

    fn read_block(&self, block: BlockId, out: &mut Vec<u8>) {
        self.log.lock().unwrap().push(format!("copy out {block:?}"));
        out.push(7);
    }

    fn write_block(&mut self, block: BlockId, _bytes: &[u8]) -> Result<(), String> {
        self.log.lock().unwrap().push(format!("copy in {block:?}"));
        Ok(())
    }
}

struct Setup {
    cache: KvCache,
    leases: Vec<Lease>,
    sanitizer: Arc<Sanitizer>,
}

/// A cache with `n` one-block holders, each having written one token in
/// the step about to run (epoch 1).
fn setup(n: usize) -> Setup {
    let hasher = BlockHasher::new(&strata_kv::HashKey::from_bytes([5; 32]), 4);
    let root = hasher.root(strata_kv::ExtraKeys {
        model_fingerprint: b"x",
        cache_salt: None,
    });
    let cache = KvCache::new(
        PoolConfig {
            num_blocks: 8,
            block_size: 4,
        },
        hasher,
    )
    .unwrap();
    let mut leases = Vec::new();
    {
        let mut g = cache.lock();
        let e = g.next_epoch();
        for i in 0..n {
            let l = g.new_lease(OwnerTag(i as u64), root);
            g.allocate(&l, 1).unwrap();
            g.write(&l, e, &[TokenId::new(1)]).unwrap();
            leases.push(l);
        }
    }
    Setup {
        cache,
        leases,
        sanitizer: Arc::new(Sanitizer::new(1)),
    }
}

fn row(s: &Setup, i: usize) -> StepSeq {
    let g = s.cache.lock();
    let table = g.table(s.leases[i].id()).unwrap().to_vec();
    let b = table[0];
    StepSeq {
        seq: RequestId(i as u64 + 1),
        start: 0,
        pending: None,
        known: vec![TokenId::new(1)],
        accesses: vec![(b, g.generation(b), Access::Write)],
        table,
        sample: true,
        suppress: Vec::new(),
        sampler: None,
        score: None,
        fanout: Vec::new(),
    }
}

fn step(seqs: Vec<StepSeq>, poison: Vec<BlockId>) -> Step {
    Step {
        epoch: strata_kv::Epoch::new(1),
        seqs,
        retire: Vec::new(),
        poison,
        demotions: Vec::new(),
        restores: Vec::new(),
        copies: Vec::new(),
    }
}

#[test]
fn a_stale_access_fails_the_step_before_the_model_runs() {
    let s = setup(2);
    let probe = Probe::default();
    let mut ex = Executor::new(probe.clone(), s.cache.clone(), s.sanitizer.clone(), None);
    let good = row(&s, 0);
    let mut stale = row(&s, 1);
    let (b, g, a) = stale.accesses[0];
    stale.accesses[0] = (b, Generation::new(g.get() + 1), a);
    let r = ex.run(step(vec![good, stale], Vec::new()));
    assert!(r.samples.is_empty(), "the step ran: {r:?}");
    assert_eq!(r.failed.len(), 2, "every row of the step fails");
    assert!(r.failed.iter().all(|f| f.error.contains("KV sanitizer")));
    assert!(
        !probe
            .log
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with("forward")),
        "the model ran on a stale block"
    );
    assert_eq!(s.sanitizer.violations(), 1);
    assert_eq!(
        s.cache.lock().stats().completed.get(),
        1,
        "the epoch was failed"
    );
}

#[test]
fn fresh_blocks_are_poisoned_before_the_forward_pass() {
    let s = setup(1);
    let probe = Probe::default();
    let mut ex = Executor::new(probe.clone(), s.cache.clone(), s.sanitizer.clone(), None);
    let r0 = row(&s, 0);
    let b = r0.table[0];
    let r = ex.run(step(vec![r0], vec![b]));
    assert_eq!(r.samples.len(), 1);
    assert_eq!(
        *probe.log.lock().unwrap(),
        vec![format!("poison {b:?}"), "forward 1".to_string()]
    );
}

#[test]
fn too_few_logits_fail_every_row_of_the_step() {
    let s = setup(2);
    let probe = Probe {
        short: true,
        ..Probe::default()
    };
    let mut ex = Executor::new(probe, s.cache.clone(), s.sanitizer.clone(), None);
    let r = ex.run(step(vec![row(&s, 0), row(&s, 1)], Vec::new()));
    assert!(
        r.samples.is_empty(),
        "a row sampled from a short batch: {r:?}"
    );
    assert_eq!(r.failed.len(), 2);
    assert!(r.failed.iter().all(|f| f.sampling));
    // Nothing the step wrote may be read again.
    let g = s.cache.lock();
    let b = g.table(s.leases[0].id()).unwrap()[0];
    let generation = g.generation(b);
    assert!(
        g.validate(strata_kv::Epoch::new(2), &[(b, generation, Access::Read)])
            .is_err()
    );
}

/// A row whose input slot cannot be resolved (here: a reference minted by
/// another cache) fails, and so does the same sequence's row in the next
/// step, planned on top of it: it must not run on the sample before.
#[test]
fn a_row_that_cannot_take_its_input_dooms_its_next_row() {
    let s = setup(1);
    let other = setup(1);
    let mut ex = Executor::new(Probe::default(), s.cache.clone(), s.sanitizer.clone(), None);
    // Step 1: an ordinary row that samples (the executor keeps its token).
    let r = ex.run(step(vec![row(&s, 0)], Vec::new()));
    assert_eq!(r.samples.len(), 1);
    let pending_row = |cache: &KvCache, lease: &Lease, e: u64| {
        let mut g = cache.lock();
        let epoch = g.next_epoch();
        assert_eq!(epoch.get(), e);
        let slot = g.write_pending(lease, epoch).unwrap();
        let table = g.table(lease.id()).unwrap().to_vec();
        StepSeq {
            seq: RequestId(1),
            start: 1,
            pending: Some(slot),
            known: Vec::new(),
            accesses: Vec::new(),
            table,
            sample: true,
            suppress: Vec::new(),
            sampler: None,
            score: None,
            fanout: Vec::new(),
        }
    };
    // Step 2: its pending input names another cache's slot.
    let mut bad = pending_row(&s.cache, &s.leases[0], 2);
    {
        let mut g = other.cache.lock();
        let e = g.next_epoch();
        bad.pending = Some(g.write_pending(&other.leases[0], e).unwrap());
    }
    let r = ex.run(Step {
        epoch: strata_kv::Epoch::new(2),
        seqs: vec![bad],
        retire: Vec::new(),
        poison: Vec::new(),
        demotions: Vec::new(),
        restores: Vec::new(),
        copies: Vec::new(),
    });
    assert!(r.samples.is_empty() && r.failed.len() == 1, "{r:?}");
    // Step 3: its next row, planned before step 2's result.
    let next = pending_row(&s.cache, &s.leases[0], 3);
    let r = ex.run(Step {
        epoch: strata_kv::Epoch::new(3),
        seqs: vec![next],
        retire: Vec::new(),
        poison: Vec::new(),
        demotions: Vec::new(),
        restores: Vec::new(),
        copies: Vec::new(),
    });
    assert!(
        r.samples.is_empty(),
        "the row ran on the sample of step 1: {r:?}"
    );
    assert_eq!(r.failed.len(), 1);
}

/// A step's transfers run in their fixed order: demotions copy out first
/// (the step may reuse their blocks), then poison, then restores copy in
/// (poison never overwrites a restore), then the forward pass.
#[test]
fn transfers_run_out_poison_in_then_forward() {
    let s = setup(1);
    let probe = Probe::default();
    let mut ex = Executor::new(probe.clone(), s.cache.clone(), s.sanitizer.clone(), None);
    let b = s.cache.lock().table(s.leases[0].id()).unwrap()[0];
    let mut st = step(vec![row(&s, 0)], vec![b]);
    st.demotions = vec![strata_kv::Demotion {
        block: b,
        hash: strata_kv::BlockHash::from_bits(1),
        parent: strata_kv::BlockHash::from_bits(0),
        tokens: vec![TokenId::new(1); 4],
    }];
    st.restores = vec![(b, vec![7])];
    let r = ex.run(st);
    assert!(r.failed.is_empty(), "{r:?}");
    assert_eq!(
        *probe.log.lock().unwrap(),
        [
            format!("copy out {b:?}"),
            format!("poison {b:?}"),
            format!("copy in {b:?}"),
            "forward 1".to_string()
        ]
    );
}
