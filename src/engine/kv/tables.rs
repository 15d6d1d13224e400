//! Block bookkeeping of the paged KV cache, kept apart from the CUDA kernels so it is tested on
//! every machine: a free list of layer-blocks shared by all plans of a base, per-sequence block
//! tables (one per plan position, so a plan with fewer layers holds fewer blocks), and the
//! per-step index arrays the kernels read (slot mapping, decode block tables, context lengths).

use std::collections::HashMap;

use crate::engine::kv::{ChunkRef, KvError, KvUsage};
use crate::engine::SeqId;

struct SeqBlocks {
    /// `tables[plan_pos][i]` holds tokens `i*block_size .. (i+1)*block_size` of that layer.
    tables: Vec<Vec<u32>>,
}

/// The pool of `total` layer-blocks of `block_size` tokens each.
pub struct BlockPool {
    block_size: usize,
    total: usize,
    free: Vec<u32>,
    seqs: HashMap<SeqId, SeqBlocks>,
}

/// Index arrays for one step of one plan group (row-major, ready to upload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepTables {
    pub plan_len: usize,
    /// `[plan_len, T]`: cache slot of each packed token at each plan position.
    pub slots: Vec<i64>,
    /// Chunks with one token: indices into the step's chunk list.
    pub decode_chunks: Vec<usize>,
    /// `[plan_len, decode, max_blocks]`, padded with block 0.
    pub decode_tables: Vec<u32>,
    pub decode_max_blocks: usize,
    /// `[decode]`: tokens each decode row attends to (its history and itself).
    pub decode_context_lens: Vec<u32>,
    pub decode_max_context: usize,
}

impl BlockPool {
    pub fn new(total: usize, block_size: usize) -> Self {
        Self {
            block_size,
            total,
            free: (0..total as u32).rev().collect(),
            seqs: HashMap::new(),
        }
    }

    pub fn block_size(&self) -> usize {
        self.block_size
    }

    pub fn allocate(&mut self, seq: SeqId, plan_len: usize) -> Result<(), KvError> {
        if self.seqs.contains_key(&seq) {
            return Err(KvError::DuplicateSequence(seq));
        }
        self.seqs.insert(
            seq,
            SeqBlocks {
                tables: vec![Vec::new(); plan_len],
            },
        );
        Ok(())
    }

    /// Grows every plan position of `seq` to hold `total_len` tokens, or fails with nothing taken.
    pub fn reserve(&mut self, seq: SeqId, total_len: usize) -> Result<(), KvError> {
        let s = self
            .seqs
            .get_mut(&seq)
            .ok_or(KvError::UnknownSequence(seq))?;
        let want = total_len.div_ceil(self.block_size);
        let per_layer = want.saturating_sub(s.tables.first().map_or(0, Vec::len));
        let needed = per_layer * s.tables.len();
        if needed > self.free.len() {
            return Err(KvError::OutOfBlocks {
                needed,
                free: self.free.len(),
                total: self.total,
                block_size: self.block_size,
            });
        }
        for table in &mut s.tables {
            for _ in 0..per_layer {
                // Checked above: `needed` blocks are free.
                table.extend(self.free.pop());
            }
        }
        Ok(())
    }

    pub fn release(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            for table in s.tables {
                self.free.extend(table);
            }
        }
    }

    pub fn usage(&self) -> KvUsage {
        KvUsage {
            used_blocks: self.total - self.free.len(),
            total_blocks: self.total,
            block_size: self.block_size,
            cached_blocks: 0,
            memo_bytes: 0,
        }
    }

    /// The block table of `seq` at `plan_pos`.
    pub fn table(&self, seq: SeqId, plan_pos: usize) -> Result<&[u32], KvError> {
        let s = self.seqs.get(&seq).ok_or(KvError::UnknownSequence(seq))?;
        s.tables
            .get(plan_pos)
            .map(Vec::as_slice)
            .ok_or(KvError::UnknownSequence(seq))
    }

    fn slot(&self, table: &[u32], pos: usize, seq: SeqId) -> Result<i64, KvError> {
        let block = table
            .get(pos / self.block_size)
            .ok_or(KvError::UnknownSequence(seq))?;
        Ok(i64::from(*block) * self.block_size as i64 + (pos % self.block_size) as i64)
    }

    /// Builds the step's index arrays. Every sequence in `chunks` must run a plan of `plan_len`
    /// positions and have room reserved for its chunk.
    pub fn step_tables(&self, chunks: &[ChunkRef], plan_len: usize) -> Result<StepTables, KvError> {
        let total_tokens: usize = chunks.iter().map(|c| c.len).sum();
        let mut slots = Vec::with_capacity(plan_len * total_tokens);
        for p in 0..plan_len {
            for c in chunks {
                let table = self.table(c.seq, p)?;
                for pos in c.start..c.start + c.len {
                    slots.push(self.slot(table, pos, c.seq)?);
                }
            }
        }
        let decode_chunks: Vec<usize> = (0..chunks.len()).filter(|&i| chunks[i].len == 1).collect();
        let decode_context_lens: Vec<u32> = decode_chunks
            .iter()
            .map(|&i| (chunks[i].start + 1) as u32)
            .collect();
        let decode_max_context = decode_context_lens.iter().max().map_or(0, |&m| m as usize);
        let decode_max_blocks = decode_max_context.div_ceil(self.block_size).max(1);
        let mut decode_tables = vec![0u32; plan_len * decode_chunks.len() * decode_max_blocks];
        for p in 0..plan_len {
            for (row, &i) in decode_chunks.iter().enumerate() {
                let table = self.table(chunks[i].seq, p)?;
                let used = (chunks[i].start + 1).div_ceil(self.block_size);
                let at = (p * decode_chunks.len() + row) * decode_max_blocks;
                decode_tables[at..at + used].copy_from_slice(&table[..used]);
            }
        }
        Ok(StepTables {
            plan_len,
            slots,
            decode_chunks,
            decode_tables,
            decode_max_blocks,
            decode_context_lens,
            decode_max_context,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reserve_takes_blocks_per_plan_position_and_release_returns_them() {
        let mut pool = BlockPool::new(20, 4);
        pool.allocate(1, 3).unwrap();
        pool.allocate(2, 2).unwrap();
        pool.reserve(1, 5).unwrap(); // 2 blocks x 3 positions
        assert_eq!(pool.usage().used_blocks, 6);
        pool.reserve(1, 8).unwrap(); // still 2 blocks per position
        assert_eq!(pool.usage().used_blocks, 6);
        pool.reserve(2, 16).unwrap(); // 4 x 2
        assert_eq!(pool.usage().used_blocks, 14);
        let err = pool.reserve(1, 20).unwrap_err(); // 3 more x 3 = 9 > 6 free
        assert!(matches!(
            err,
            KvError::OutOfBlocks {
                needed: 9,
                free: 6,
                ..
            }
        ));
        assert_eq!(
            pool.usage().used_blocks,
            14,
            "a failed reserve takes nothing"
        );
        let mut all: Vec<u32> = (0..3)
            .flat_map(|p| pool.table(1, p).unwrap().to_vec())
            .collect();
        all.extend((0..2).flat_map(|p| pool.table(2, p).unwrap().to_vec()));
        all.sort();
        all.dedup();
        assert_eq!(all.len(), 14, "no block is handed out twice");
        pool.release(1);
        assert_eq!(pool.usage().used_blocks, 8);
        assert!(pool.table(1, 0).is_err());
    }

    #[test]
    fn step_tables_map_positions_to_slots_and_pad_decode_tables() {
        let mut pool = BlockPool::new(32, 4);
        for (seq, len) in [(7u64, 6usize), (8, 9)] {
            pool.allocate(seq, 2).unwrap();
            pool.reserve(seq, len).unwrap();
        }
        // seq 7 prefills tokens 0..5, seq 8 decodes its token at position 8.
        let chunks = [
            ChunkRef {
                seq: 7,
                offset: 0,
                len: 5,
                start: 0,
            },
            ChunkRef {
                seq: 8,
                offset: 5,
                len: 1,
                start: 8,
            },
        ];
        let t = pool.step_tables(&chunks, 2).unwrap();
        assert_eq!(t.slots.len(), 2 * 6);
        for p in 0..2 {
            let t7 = pool.table(7, p).unwrap();
            let t8 = pool.table(8, p).unwrap();
            let want: Vec<i64> = (0..5)
                .map(|pos| i64::from(t7[pos / 4]) * 4 + (pos % 4) as i64)
                .chain([i64::from(t8[2]) * 4])
                .collect();
            assert_eq!(&t.slots[p * 6..(p + 1) * 6], want.as_slice());
            assert_eq!(
                &t.decode_tables[p * 3..(p + 1) * 3],
                &t8[..3],
                "the decode row's table covers its 9 tokens"
            );
        }
        assert_eq!(t.decode_chunks, vec![1]);
        assert_eq!(t.decode_context_lens, vec![9]);
        assert_eq!((t.decode_max_blocks, t.decode_max_context), (3, 9));
    }
}
