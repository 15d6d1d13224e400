//! A decode graph's step indices ([`PaddedDecode`]), written in place each step into buffers the
//! paged cache keeps: the step's rows first, then padding rows that write nowhere (slot -1) and
//! attend to the first token of block 0. Each row's sequence is looked up once for all plan
//! positions, and the buffers are reused while the graph's shape holds, so a step of hundreds
//! of rows over dozens of layers costs a copy of the blocks its rows use, not a rebuild of
//! megabytes (docs/benchmarks.md, session 22).
//!
//! Only entries the kernels read are written: a row's blocks below its context length, and
//! entry 0 of each padding row. The rest keep what an earlier step wrote there, block ids of this
//! pool like any other, which the decode kernels never read (they stop at the context length).

use crate::engine::kv::tables::BlockPool;
use crate::engine::kv::{ChunkRef, KvError};

/// A decode-only step's indices laid out for a captured decode graph of `rows` rows and
/// `max_blocks` blocks per table.
#[derive(Debug, Default, PartialEq)]
pub struct PaddedDecode {
    /// `[plan_len, rows]`.
    pub slots: Vec<i64>,
    /// `[plan_len, rows, max_blocks]`.
    pub tables: Vec<u32>,
    /// `[rows]`.
    pub context_lens: Vec<u32>,
    /// (plan_len, rows, max_blocks) the buffers are laid out for.
    shape: (usize, usize, usize),
}

impl PaddedDecode {
    /// Writes the step of `chunks` (one token each) at plan depth `plan_len`, padded to `rows`
    /// rows and `max_blocks` blocks per table; `false` (nothing to use) when a chunk holds more
    /// than one token or the step does not fit.
    pub fn fill(
        &mut self,
        pool: &BlockPool,
        chunks: &[ChunkRef],
        plan_len: usize,
        (rows, max_blocks): (usize, usize),
    ) -> Result<bool, KvError> {
        let bs = pool.block_size();
        let used_blocks = |c: &ChunkRef| (c.start + 1).div_ceil(bs);
        if chunks.len() > rows
            || chunks
                .iter()
                .any(|c| c.len != 1 || used_blocks(c) > max_blocks)
        {
            return Ok(false);
        }
        let shape = (plan_len, rows, max_blocks);
        if self.shape != shape {
            *self = Self {
                slots: vec![-1; plan_len * rows],
                tables: vec![0; plan_len * rows * max_blocks],
                context_lens: vec![1; rows],
                shape,
            };
        }
        for (r, c) in chunks.iter().enumerate() {
            let tables = pool.tables_of(c.seq)?;
            let used = used_blocks(c);
            for p in 0..plan_len {
                let table = tables
                    .get(p)
                    .and_then(|t| t.get(..used))
                    .ok_or(KvError::UnknownSequence(c.seq))?;
                let at = (p * rows + r) * max_blocks;
                self.tables[at..at + used].copy_from_slice(table);
                self.slots[p * rows + r] = pool.slot(table, c.start, c.seq)?;
            }
            self.context_lens[r] = (c.start + 1) as u32;
        }
        for r in chunks.len()..rows {
            for p in 0..plan_len {
                self.slots[p * rows + r] = -1;
                self.tables[(p * rows + r) * max_blocks] = 0;
            }
            self.context_lens[r] = 1;
        }
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seq: u64, start: usize) -> ChunkRef {
        ChunkRef {
            seq,
            offset: 0,
            len: 1,
            start,
            scored: false,
        }
    }

    /// Checks every entry the kernels read against the pool's own tables and slots.
    fn check(p: &PaddedDecode, pool: &BlockPool, chunks: &[ChunkRef], plan_len: usize) {
        let (_, rows, max_blocks) = p.shape;
        let bs = pool.block_size();
        for pos in 0..plan_len {
            for (r, c) in chunks.iter().enumerate() {
                let table = pool.table(c.seq, pos).unwrap();
                let used = (c.start + 1).div_ceil(bs);
                let at = (pos * rows + r) * max_blocks;
                assert_eq!(
                    &p.tables[at..at + used],
                    &table[..used],
                    "row {r} position {pos}"
                );
                let block = i64::from(table[c.start / bs]);
                assert_eq!(
                    p.slots[pos * rows + r],
                    block * bs as i64 + (c.start % bs) as i64
                );
            }
            for r in chunks.len()..rows {
                assert_eq!(p.slots[pos * rows + r], -1, "a padding row writes nowhere");
                assert_eq!(p.tables[(pos * rows + r) * max_blocks], 0);
            }
        }
        let mut lens: Vec<u32> = chunks.iter().map(|c| (c.start + 1) as u32).collect();
        lens.resize(rows, 1);
        assert_eq!(p.context_lens, lens);
    }

    #[test]
    fn padded_decode_keeps_every_row_and_pads_with_inert_rows() {
        let mut pool = BlockPool::new(40, 4);
        for (seq, len) in [(1, 6), (2, 9)] {
            pool.allocate(seq, 2).unwrap();
            pool.reserve(seq, len).unwrap();
        }
        let chunks = [chunk(1, 5), chunk(2, 8)];
        let mut p = PaddedDecode::default();
        assert!(p.fill(&pool, &chunks, 2, (4, 5)).unwrap());
        check(&p, &pool, &chunks, 2);
        // A fresh layout pads with block 0 past each row's blocks.
        assert!(p.tables[(1 + 1) * 5 + 3..(1 + 2) * 5]
            .iter()
            .all(|&b| b == 0));
        // Too few rows or blocks, or a prompt row: nothing to use.
        assert!(!p.fill(&pool, &chunks, 2, (1, 5)).unwrap());
        assert!(!p.fill(&pool, &chunks, 2, (4, 2)).unwrap());
        let prompt = [ChunkRef {
            len: 2,
            ..chunk(1, 4)
        }];
        assert!(!p.fill(&pool, &prompt, 2, (4, 5)).unwrap());
        // An unknown sequence is an error, not a silent row.
        assert!(matches!(
            p.fill(&pool, &[chunk(9, 0)], 2, (4, 5)),
            Err(KvError::UnknownSequence(9))
        ));
    }

    #[test]
    fn a_reused_layout_matches_a_fresh_one_wherever_the_kernels_read() {
        let mut pool = BlockPool::new(400, 4);
        for seq in 1..=6u64 {
            pool.allocate(seq, 3).unwrap();
            pool.reserve(seq, 4 * seq as usize + 9).unwrap();
        }
        let mut reused = PaddedDecode::default();
        let steps: [&[ChunkRef]; 4] = [
            &[chunk(1, 12), chunk(2, 15), chunk(3, 18), chunk(4, 22)],
            // Fewer rows, other sequences in other rows, one longer.
            &[chunk(6, 31), chunk(2, 16)],
            // A released and re-reserved sequence gets other blocks.
            &[chunk(1, 3), chunk(5, 27), chunk(3, 19)],
            &[],
        ];
        for (i, chunks) in steps.iter().enumerate() {
            if i == 2 {
                pool.release(1);
                pool.allocate(1, 3).unwrap();
                pool.reserve(1, 10).unwrap();
            }
            assert!(reused.fill(&pool, chunks, 3, (8, 9)).unwrap());
            check(&reused, &pool, chunks, 3);
            let mut fresh = PaddedDecode::default();
            assert!(fresh.fill(&pool, chunks, 3, (8, 9)).unwrap());
            check(&fresh, &pool, chunks, 3);
            assert_eq!(reused.slots, fresh.slots, "step {i}");
            assert_eq!(reused.context_lens, fresh.context_lens, "step {i}");
        }
        // Another shape lays the buffers out again.
        assert!(reused.fill(&pool, steps[1], 2, (4, 9)).unwrap());
        check(&reused, &pool, steps[1], 2);
        assert_eq!(reused.tables.len(), 2 * 4 * 9);
    }
}
