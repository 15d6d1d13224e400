//! Block bookkeeping of the paged KV cache, kept apart from the CUDA kernels so it is tested on
//! every machine: a free list of layer-blocks shared by all plans of a base, per-sequence block
//! tables (one per plan position, so a plan with fewer layers holds fewer blocks), and the
//! per-step index arrays the kernels read (slot mapping, decode block tables, context lengths).
//!
//! Blocks are counted: a block is held by the sequences whose tables name it and by the prefix
//! cache's entries, and returns to the free list when the last of them lets it go. A sequence
//! that starts from cached blocks ([`BlockPool::attach`]) only ever writes after them: cached
//! prefixes are whole blocks, and its next token opens a block of its own.

use std::collections::HashMap;

use crate::engine::kv::prefix::CachedKv;
use crate::engine::kv::{ChunkRef, KvError, KvUsage};
use crate::engine::SeqId;

struct SeqBlocks {
    /// `tables[plan_pos][i]` holds tokens `i*block_size .. (i+1)*block_size` of that layer.
    tables: Vec<Vec<u32>>,
}

/// Who holds a block: how many sequences' tables and how many prefix-cache entries.
#[derive(Debug, Clone, Copy, Default)]
struct Holders {
    seqs: u32,
    entries: u32,
}

/// The pool of `total` layer-blocks of `block_size` tokens each.
pub struct BlockPool {
    block_size: usize,
    total: usize,
    free: Vec<u32>,
    holders: Vec<Holders>,
    /// Blocks some sequence holds.
    live: usize,
    /// Blocks only prefix-cache entries hold.
    cached: usize,
    seqs: HashMap<SeqId, SeqBlocks>,
}

/// Per plan position, the blocks holding a prefix's tokens (whole blocks): what a prefix-cache
/// entry of the paged cache holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BlockTables {
    pub block_size: usize,
    pub tables: Vec<Vec<u32>>,
}

impl CachedKv for BlockTables {
    fn head(&self, positions: usize, tokens: usize) -> candle_core::Result<Self> {
        let blocks = tokens / self.block_size;
        let tables = self.tables[..positions.min(self.tables.len())]
            .iter()
            .map(|t| t.get(..blocks).map(<[u32]>::to_vec))
            .collect::<Option<Vec<_>>>()
            .ok_or_else(|| candle_core::Error::Msg("prefix entry shorter than asked".into()))?;
        Ok(Self {
            block_size: self.block_size,
            tables,
        })
    }

    fn keep(&self, tokens: usize) -> candle_core::Result<Self> {
        self.head(self.tables.len(), tokens)
    }

    fn positions(&self) -> usize {
        self.tables.len()
    }
}

/// Index arrays for one step of one plan group (row-major, ready to upload).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepTables {
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
            holders: vec![Holders::default(); total],
            live: 0,
            cached: 0,
            seqs: HashMap::new(),
        }
    }

    pub fn total_blocks(&self) -> usize {
        self.total
    }

    /// Blocks no one holds.
    pub fn free_blocks(&self) -> usize {
        self.free.len()
    }

    /// Adds (`+1`) or removes (`-1`) one holder of `block`, a sequence or an entry, keeping the
    /// live and cached counts and the free list.
    fn hold(&mut self, block: u32, seq: bool, delta: i32) {
        let h = &mut self.holders[block as usize];
        let before = *h;
        let count = if seq { &mut h.seqs } else { &mut h.entries };
        *count = count.saturating_add_signed(delta);
        let after = *h;
        let state = |h: Holders| (h.seqs > 0, h.seqs == 0 && h.entries > 0);
        let ((was_live, was_cached), (is_live, is_cached)) = (state(before), state(after));
        self.live = self.live + usize::from(is_live) - usize::from(was_live);
        self.cached = self.cached + usize::from(is_cached) - usize::from(was_cached);
        if after.seqs == 0 && after.entries == 0 && (before.seqs > 0 || before.entries > 0) {
            self.free.push(block);
        }
    }

    /// Starts the sequence `seq` (nothing written yet) from `tables`: per plan position, the
    /// blocks of its first tokens (whole blocks, as the prefix cache keeps them), in place of
    /// the first blocks it reserved (those are given back); `false` (nothing changed) when the
    /// position counts differ.
    pub fn attach(&mut self, seq: SeqId, tables: &[Vec<u32>]) -> bool {
        match self.seqs.get(&seq) {
            Some(s) if s.tables.len() == tables.len() => {
                self.adopt(seq, tables);
                true
            }
            _ => false,
        }
    }

    /// Puts `leading[p]` in place of the first blocks of `seq`'s plan position `p` (appended
    /// where it holds fewer), taking `seq`'s hold on them and giving back its own.
    fn adopt(&mut self, seq: SeqId, leading: &[Vec<u32>]) {
        let Some(own) = self.seqs.get(&seq).map(|s| s.tables.clone()) else {
            return;
        };
        for (p, blocks) in leading.iter().enumerate() {
            for (i, &shared) in blocks.iter().enumerate() {
                self.hold(shared, true, 1);
                if let Some(&mine) = own[p].get(i) {
                    self.hold(mine, true, -1);
                }
            }
        }
        if let Some(s) = self.seqs.get_mut(&seq) {
            for (table, blocks) in s.tables.iter_mut().zip(leading) {
                let rest = table.get(blocks.len()..).unwrap_or_default().to_vec();
                *table = blocks.iter().copied().chain(rest).collect();
            }
        }
    }

    /// The first `blocks` blocks of each of `seq`'s plan positions (`None` when it holds fewer).
    pub fn leading_blocks(&self, seq: SeqId, blocks: usize) -> Option<Vec<Vec<u32>>> {
        let s = self.seqs.get(&seq)?;
        s.tables
            .iter()
            .map(|t| t.get(..blocks).map(<[u32]>::to_vec))
            .collect()
    }

    /// Gives `to` (fresh: nothing written yet, room reserved for `tokens`) the blocks `from`
    /// wrote for its first `tokens` tokens at plan positions `0..positions`: whole blocks are
    /// shared (`to`'s own are given back); a partly filled last block is not (both will write
    /// after it), and is returned as (from's block, to's block) pairs whose contents the caller
    /// copies. `None` (nothing changed) when either holds too few positions or blocks.
    pub fn share_prefix(
        &mut self,
        from: SeqId,
        to: SeqId,
        positions: usize,
        tokens: usize,
    ) -> Option<Vec<(u32, u32)>> {
        let need = tokens.div_ceil(self.block_size);
        let full = tokens / self.block_size;
        let src = self.seqs.get(&from)?.tables.get(..positions)?.to_vec();
        let dst = self.seqs.get(&to)?.tables.get(..positions)?.to_vec();
        if from == to || src.iter().chain(&dst).any(|t| t.len() < need) {
            return None;
        }
        let copies = if full < need {
            src.iter()
                .zip(&dst)
                .map(|(s, d)| (s[full], d[full]))
                .collect()
        } else {
            Vec::new()
        };
        let leading: Vec<Vec<u32>> = src.iter().map(|s| s[..full].to_vec()).collect();
        self.adopt(to, &leading);
        Some(copies)
    }

    /// A prefix-cache entry takes (`true`) or lets go of (`false`) `tables`' blocks.
    pub fn hold_for_entry(&mut self, tables: &[Vec<u32>], take: bool) {
        for &b in tables.iter().flatten() {
            self.hold(b, false, if take { 1 } else { -1 });
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
        let mut taken = Vec::with_capacity(needed);
        for table in &mut s.tables {
            for _ in 0..per_layer {
                // Checked above: `needed` blocks are free.
                if let Some(b) = self.free.pop() {
                    table.push(b);
                    taken.push(b);
                }
            }
        }
        for b in taken {
            self.hold(b, true, 1);
        }
        Ok(())
    }

    pub fn release(&mut self, seq: SeqId) {
        if let Some(s) = self.seqs.remove(&seq) {
            for b in s.tables.into_iter().flatten() {
                self.hold(b, true, -1);
            }
        }
    }

    /// Blocks held by sequences (`used_blocks`) and only by prefix-cache entries
    /// (`cached_blocks`); the prompt-score bytes are the cache's to fill in.
    pub fn usage(&self) -> KvUsage {
        KvUsage {
            used_blocks: self.live,
            total_blocks: self.total,
            block_size: self.block_size,
            cached_blocks: self.cached,
            memo_bytes: 0,
        }
    }

    /// The block tables of `seq`, one per plan position.
    pub fn tables_of(&self, seq: SeqId) -> Result<&[Vec<u32>], KvError> {
        self.seqs
            .get(&seq)
            .map(|s| s.tables.as_slice())
            .ok_or(KvError::UnknownSequence(seq))
    }

    /// The block table of `seq` at `plan_pos`.
    pub fn table(&self, seq: SeqId, plan_pos: usize) -> Result<&[u32], KvError> {
        self.tables_of(seq)?
            .get(plan_pos)
            .map(Vec::as_slice)
            .ok_or(KvError::UnknownSequence(seq))
    }

    /// The cache slot of token `pos` of `seq`, whose block table (at one plan position) is `table`.
    pub fn slot(&self, table: &[u32], pos: usize, seq: SeqId) -> Result<i64, KvError> {
        let block = table
            .get(pos / self.block_size)
            .ok_or(KvError::UnknownSequence(seq))?;
        Ok(i64::from(*block) * self.block_size as i64 + (pos % self.block_size) as i64)
    }

    /// Builds the step's index arrays. Every sequence in `chunks` must run a plan of `plan_len`
    /// positions and have room reserved for its chunk.
    pub fn step_tables(&self, chunks: &[ChunkRef], plan_len: usize) -> Result<StepTables, KvError> {
        let total_tokens: usize = chunks.iter().map(|c| c.len).sum();
        // Each chunk's sequence is looked up once, for every plan position.
        let seq_tables = chunks
            .iter()
            .map(|c| self.tables_of(c.seq))
            .collect::<Result<Vec<_>, _>>()?;
        let at = |i: usize, p: usize| {
            seq_tables[i]
                .get(p)
                .map(Vec::as_slice)
                .ok_or(KvError::UnknownSequence(chunks[i].seq))
        };
        // `[plan_len, T]`, each position's tokens in chunk order.
        let mut slots = vec![0i64; plan_len * total_tokens];
        let mut first = 0;
        for (i, c) in chunks.iter().enumerate() {
            for p in 0..plan_len {
                let table = at(i, p)?;
                for (k, pos) in (c.start..c.start + c.len).enumerate() {
                    slots[p * total_tokens + first + k] = self.slot(table, pos, c.seq)?;
                }
            }
            first += c.len;
        }
        let decode_chunks: Vec<usize> = (0..chunks.len()).filter(|&i| chunks[i].len == 1).collect();
        let decode_context_lens: Vec<u32> = decode_chunks
            .iter()
            .map(|&i| (chunks[i].start + 1) as u32)
            .collect();
        let decode_max_context = decode_context_lens.iter().max().map_or(0, |&m| m as usize);
        let decode_max_blocks = decode_max_context.div_ceil(self.block_size).max(1);
        let rows = decode_chunks.len();
        let mut decode_tables = vec![0u32; plan_len * rows * decode_max_blocks];
        for (row, &i) in decode_chunks.iter().enumerate() {
            let used = (chunks[i].start + 1).div_ceil(self.block_size);
            for p in 0..plan_len {
                let table = at(i, p)?;
                let blocks = table
                    .get(..used)
                    .ok_or(KvError::UnknownSequence(chunks[i].seq))?;
                let to = (p * rows + row) * decode_max_blocks;
                decode_tables[to..to + used].copy_from_slice(blocks);
            }
        }
        Ok(StepTables {
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
                scored: false,
            },
            ChunkRef {
                seq: 8,
                offset: 5,
                len: 1,
                start: 8,
                scored: false,
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

    #[test]
    fn shared_blocks_return_to_the_pool_when_their_last_holder_lets_go() {
        let mut pool = BlockPool::new(16, 4);
        let counts = |p: &BlockPool| {
            let u = p.usage();
            (u.used_blocks, u.cached_blocks, p.free_blocks())
        };
        pool.allocate(1, 2).unwrap();
        pool.reserve(1, 10).unwrap(); // 3 blocks x 2 positions
        let head = pool.leading_blocks(1, 2).unwrap(); // 8 tokens x 2 positions
        assert!(pool.leading_blocks(1, 4).is_none());
        pool.hold_for_entry(&head, true);
        assert_eq!(counts(&pool), (6, 0, 10));
        pool.release(1);
        assert_eq!(counts(&pool), (0, 4, 12), "the entry keeps its 4 blocks");
        // A sequence that reserved room for its prompt starts from them instead of its own
        // first blocks, and grows past them into blocks of its own.
        pool.allocate(2, 2).unwrap();
        pool.reserve(2, 9).unwrap(); // 3 blocks x 2 positions
        assert_eq!(counts(&pool), (6, 4, 6));
        assert!(pool.attach(2, &head));
        assert_eq!(
            counts(&pool),
            (6, 0, 10),
            "its own first two blocks were given back"
        );
        pool.reserve(2, 13).unwrap();
        assert_eq!(counts(&pool), (8, 0, 8));
        for (p, blocks) in head.iter().enumerate() {
            assert_eq!(&pool.table(2, p).unwrap()[..2], blocks.as_slice());
        }
        pool.allocate(3, 3).unwrap();
        assert!(!pool.attach(3, &head), "position counts must match");
        // The entry lets go while the sequence still holds them: nothing is freed yet.
        pool.hold_for_entry(&head, false);
        assert_eq!(counts(&pool), (8, 0, 8));
        pool.release(2);
        pool.release(3);
        assert_eq!(counts(&pool), (0, 0, 16));
        let mut free = pool.free.clone();
        free.sort();
        assert_eq!(free, (0..16).collect::<Vec<u32>>(), "every block once");
    }

    #[test]
    fn block_tables_hand_over_whole_blocks_of_the_positions_asked() {
        let t = BlockTables {
            block_size: 4,
            tables: vec![vec![1, 2, 3], vec![4, 5, 6], vec![7, 8, 9]],
        };
        let head = t.head(2, 8).unwrap();
        assert_eq!(head.tables, vec![vec![1, 2], vec![4, 5]]);
        assert_eq!(t.keep(4).unwrap().tables, vec![vec![1], vec![4], vec![7]]);
        assert!(t.head(3, 16).is_err());
    }

    #[test]
    fn a_branch_shares_whole_blocks_and_copies_the_partial_one() {
        let mut pool = BlockPool::new(32, 4);
        for seq in [1, 2] {
            pool.allocate(seq, 3).unwrap();
            pool.reserve(seq, 10).unwrap(); // 3 blocks x 3 positions each
        }
        assert_eq!(pool.usage().used_blocks, 18);
        let trunk: Vec<Vec<u32>> = (0..3).map(|p| pool.table(1, p).unwrap().to_vec()).collect();
        let own: Vec<Vec<u32>> = (0..3).map(|p| pool.table(2, p).unwrap().to_vec()).collect();
        // 10 tokens: two whole blocks shared, the third copied, at the first two positions.
        let copies = pool.share_prefix(1, 2, 2, 10).unwrap();
        assert_eq!(
            copies,
            vec![(trunk[0][2], own[0][2]), (trunk[1][2], own[1][2])]
        );
        for p in 0..2 {
            let t = pool.table(2, p).unwrap();
            assert_eq!(&t[..2], &trunk[p][..2]);
            assert_eq!(t[2], own[p][2]);
        }
        assert_eq!(
            pool.table(2, 2).unwrap(),
            own[2].as_slice(),
            "position 2 is its own"
        );
        assert_eq!(
            pool.usage().used_blocks,
            14,
            "four of its own blocks given back"
        );
        assert!(
            pool.share_prefix(1, 2, 4, 10).is_none(),
            "more positions than held"
        );
        assert!(
            pool.share_prefix(1, 2, 2, 20).is_none(),
            "more tokens than reserved"
        );
        pool.release(1);
        assert_eq!(
            pool.usage().used_blocks,
            9,
            "the shared blocks stay with seq 2"
        );
        pool.release(2);
        assert_eq!(pool.free_blocks(), 32);
    }
}
