//! How many cached tokens each block of the split decode attention walks (`decode.rs`), from the
//! step's shape alone, so that CPU tests pin the choice the CUDA launch makes.

/// Tokens per partition of the split walk for `pairs` (sequence, kv head) pairs over up to
/// `max_context` tokens: longer partitions when there are enough pairs to fill the device (fewer
/// partial results to merge, and each warp walks more blocks); with fewer than 256 pairs, doubled
/// up to 1,024 while the step keeps blocks for at least 7/8 of the multiprocessors. Measured on
/// the H200 (132 SMs; 8B shape, 7,296-token contexts, docs/benchmarks.md session 21): one row's
/// decode step (8 pairs) 5.15 ms at 128 tokens (456 blocks), 4.84 at 256 (232), 4.75 at 512
/// (120), 4.88 at 1,024 (64); four rows' 6.48, 6.01, 5.90 and 5.60 ms (1,024: 256 blocks).
pub fn split_partition(pairs: usize, max_context: usize, sms: usize) -> usize {
    let mut part = match pairs {
        0..256 => 128,
        256..1024 => 256,
        _ => 512,
    };
    if pairs < 256 {
        let enough = sms - sms / 8;
        while part < 1024 && pairs * max_context.div_ceil(2 * part) >= enough {
            part *= 2;
        }
    }
    part
}

#[cfg(test)]
mod tests {
    use super::split_partition;

    /// The measured choices: few pairs over long contexts take longer partitions while 7/8 of
    /// the multiprocessors keep a block; short contexts and many pairs keep the earlier lengths.
    #[test]
    fn few_pairs_over_long_contexts_take_longer_partitions() {
        // One and four rows of the 8B shape (8 kv heads) over 7,296 tokens on 132 SMs.
        assert_eq!(split_partition(8, 7296, 132), 512);
        assert_eq!(split_partition(32, 7296, 132), 1024);
        // Batch-1 decoding of short prompts is unchanged.
        assert_eq!(split_partition(8, 640, 132), 128);
        assert_eq!(split_partition(8, 2048, 132), 128);
        // One row over 4,096 tokens: 128 blocks of 256 tokens.
        assert_eq!(split_partition(8, 4096, 132), 256);
        // 64 and 256 rows: the pairs' rule alone.
        assert_eq!(split_partition(512, 700, 132), 256);
        assert_eq!(split_partition(2048, 1280, 132), 512);
        // Never past 1,024, and a smaller device doubles further.
        assert_eq!(split_partition(200, 100_000, 132), 1024);
        assert_eq!(split_partition(8, 7296, 16), 1024);
    }
}
