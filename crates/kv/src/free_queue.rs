//! The LRU queue of refcount-0 blocks, an intrusive doubly linked list over
//! block indices: push at either end, pop the front and unlink any member
//! in O(1), with no allocation after construction.
//!
//! ```text
//!   front (evicted first)                        back (evicted last)
//!   [empty blocks ...][cached blocks, least recently freed ... most recently]
//! ```
//!
//! NOTE: written by hand because the pool needs O(1) removal of an arbitrary
//! member (a prefix hit on a free cached block takes it out of the queue);
//! `VecDeque` cannot do that, and linked-list crates allocate per node.

use crate::ids::BlockId;

const NIL: u32 = u32::MAX;

#[derive(Clone, Copy)]
struct Link {
    prev: u32,
    next: u32,
}

/// The free queue. Membership is tracked by the pool (a block is in the
/// queue exactly when its state is free); the queue trusts it.
///
/// # Invariants
/// - `len` equals the number of blocks reachable from `head`.
/// - `links[b].prev` / `.next` are `NIL` for every block not in the queue.
pub(crate) struct FreeQueue {
    links: Vec<Link>,
    head: u32,
    tail: u32,
    len: usize,
}

impl FreeQueue {
    pub(crate) fn new(capacity: usize) -> Self {
        Self {
            links: vec![
                Link {
                    prev: NIL,
                    next: NIL
                };
                capacity
            ],
            head: NIL,
            tail: NIL,
            len: 0,
        }
    }

    pub(crate) fn len(&self) -> usize {
        self.len
    }

    pub(crate) fn push_back(&mut self, b: BlockId) {
        let i = b.index() as u32;
        self.links[i as usize] = Link {
            prev: self.tail,
            next: NIL,
        };
        if self.tail == NIL {
            self.head = i;
        } else {
            self.links[self.tail as usize].next = i;
        }
        self.tail = i;
        self.len += 1;
    }

    pub(crate) fn push_front(&mut self, b: BlockId) {
        let i = b.index() as u32;
        self.links[i as usize] = Link {
            prev: NIL,
            next: self.head,
        };
        if self.head == NIL {
            self.tail = i;
        } else {
            self.links[self.head as usize].prev = i;
        }
        self.head = i;
        self.len += 1;
    }

    pub(crate) fn pop_front(&mut self) -> Option<BlockId> {
        if self.head == NIL {
            return None;
        }
        let b = BlockId::new(self.head);
        self.remove(b);
        Some(b)
    }

    pub(crate) fn front(&self) -> Option<BlockId> {
        (self.head != NIL).then(|| BlockId::new(self.head))
    }

    /// Unlinks `b`, which must be in the queue.
    pub(crate) fn remove(&mut self, b: BlockId) {
        let i = b.index();
        let Link { prev, next } = self.links[i];
        debug_assert!(
            prev != NIL || self.head == i as u32,
            "{b:?} is not in the free queue"
        );
        if prev == NIL {
            self.head = next;
        } else {
            self.links[prev as usize].next = next;
        }
        if next == NIL {
            self.tail = prev;
        } else {
            self.links[next as usize].prev = prev;
        }
        self.links[i] = Link {
            prev: NIL,
            next: NIL,
        };
        self.len -= 1;
    }

    /// The block after `b` (towards the back), for walks from the front.
    pub(crate) fn next(&self, b: BlockId) -> Option<BlockId> {
        let n = self.links[b.index()].next;
        (n != NIL).then(|| BlockId::new(n))
    }

    /// Front to back. O(len): for invariant checks and tests only.
    pub(crate) fn iter(&self) -> impl Iterator<Item = BlockId> + '_ {
        let mut cur = self.head;
        std::iter::from_fn(move || {
            if cur == NIL {
                return None;
            }
            let b = BlockId::new(cur);
            cur = self.links[cur as usize].next;
            Some(b)
        })
    }

    /// Checks the links against `len`, both directions.
    pub(crate) fn check(&self) -> Result<(), String> {
        let forward: Vec<_> = self.iter().collect();
        if forward.len() != self.len {
            return Err(format!(
                "free queue len {} but {} linked",
                self.len,
                forward.len()
            ));
        }
        let mut back = Vec::with_capacity(self.len);
        let mut cur = self.tail;
        while cur != NIL && back.len() <= self.len {
            back.push(BlockId::new(cur));
            cur = self.links[cur as usize].prev;
        }
        back.reverse();
        if back != forward {
            return Err("free queue prev links disagree with next links".into());
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(q: &FreeQueue) -> Vec<u32> {
        q.iter().map(|b| b.index() as u32).collect()
    }

    #[test]
    fn pushes_pops_and_removes_in_order() {
        let mut q = FreeQueue::new(8);
        for i in [3, 1, 4] {
            q.push_back(BlockId::new(i));
            q.check().unwrap();
        }
        q.push_front(BlockId::new(5));
        assert_eq!(ids(&q), [5, 3, 1, 4]);
        q.remove(BlockId::new(1));
        q.check().unwrap();
        assert_eq!(ids(&q), [5, 3, 4]);
        q.remove(BlockId::new(4));
        q.check().unwrap();
        assert_eq!(q.pop_front(), Some(BlockId::new(5)));
        assert_eq!(ids(&q), [3]);
        assert_eq!(q.len(), 1);
        q.remove(BlockId::new(3));
        q.check().unwrap();
        assert_eq!(q.pop_front(), None);
        assert_eq!(q.len(), 0);
    }
}
