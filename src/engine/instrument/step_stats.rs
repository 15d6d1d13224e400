//! Where engine time goes under load: step wall time by kind (decode-only steps vs steps with
//! prefill rows), with rows per step, logged at info level every 10 s while steps run; decode-only
//! steps are also totalled over the batcher's life ([`DecodeOnly`], which `pruneserve bench`
//! reports beside its throughput figures).

use std::time::{Duration, Instant};

use crate::engine::StepItem;

#[derive(Default)]
struct Totals {
    steps: usize,
    seconds: f64,
    decode_rows: usize,
    prefill_tokens: usize,
}

impl Totals {
    fn describe(&self) -> String {
        if self.steps == 0 {
            return "none".into();
        }
        let n = self.steps as f64;
        format!(
            "{} steps, {:.2} ms/step, {:.1} decode rows + {:.0} prefill tokens/step",
            self.steps,
            1e3 * self.seconds / n,
            self.decode_rows as f64 / n,
            self.prefill_tokens as f64 / n
        )
    }
}

pub struct StepStats {
    window_start: Instant,
    decode_only: Totals,
    with_prefill: Totals,
    /// Decode-only steps since the batcher started (not reset with the window).
    lifetime: DecodeOnly,
}

/// Decode-only steps (every row one token) run so far: their number, wall seconds and rows.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct DecodeOnly {
    pub steps: usize,
    pub seconds: f64,
    pub rows: usize,
}

impl DecodeOnly {
    /// What ran between `earlier` and `self`.
    pub fn since(&self, earlier: &DecodeOnly) -> DecodeOnly {
        DecodeOnly {
            steps: self.steps - earlier.steps,
            seconds: self.seconds - earlier.seconds,
            rows: self.rows - earlier.rows,
        }
    }
}

const REPORT_EVERY: Duration = Duration::from_secs(10);

impl Default for StepStats {
    fn default() -> Self {
        Self {
            window_start: Instant::now(),
            decode_only: Totals::default(),
            with_prefill: Totals::default(),
            lifetime: DecodeOnly::default(),
        }
    }
}

impl StepStats {
    pub fn record(&mut self, items: &[StepItem], elapsed: Duration) {
        let decode_rows = items.iter().filter(|i| i.tokens.len() == 1).count();
        let prefill_tokens: usize = items
            .iter()
            .filter(|i| i.tokens.len() > 1)
            .map(|i| i.tokens.len())
            .sum();
        let t = if prefill_tokens == 0 {
            &mut self.decode_only
        } else {
            &mut self.with_prefill
        };
        t.steps += 1;
        t.seconds += elapsed.as_secs_f64();
        t.decode_rows += decode_rows;
        t.prefill_tokens += prefill_tokens;
        if prefill_tokens == 0 {
            self.lifetime.steps += 1;
            self.lifetime.seconds += elapsed.as_secs_f64();
            self.lifetime.rows += decode_rows;
        }
        if self.window_start.elapsed() >= REPORT_EVERY {
            tracing::info!(
                decode_only = %self.decode_only.describe(),
                with_prefill = %self.with_prefill.describe(),
                "engine steps in the last {:.0} s",
                self.window_start.elapsed().as_secs_f64()
            );
            *self = Self {
                lifetime: self.lifetime,
                ..Self::default()
            };
        }
    }

    /// Decode-only steps since the batcher started.
    pub fn decode_only(&self) -> DecodeOnly {
        self.lifetime
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(seq: u64, tokens: usize) -> StepItem {
        StepItem {
            seq,
            tokens: vec![1; tokens],
            score: None,
            want_logits: true,
            greedy_top: Some(0),
            draw: None,
        }
    }

    #[test]
    fn lifetime_totals_count_decode_only_steps() {
        let mut s = StepStats::default();
        s.record(&[item(1, 1), item(2, 1)], Duration::from_millis(4));
        let before = s.decode_only();
        s.record(&[item(1, 1), item(3, 7)], Duration::from_millis(30));
        s.record(
            &[item(1, 1), item(2, 1), item(3, 1)],
            Duration::from_millis(6),
        );
        assert_eq!(before.steps, 1);
        assert_eq!(before.rows, 2);
        let d = s.decode_only().since(&before);
        assert_eq!((d.steps, d.rows), (1, 3));
        assert!((d.seconds - 0.006).abs() < 1e-9, "{d:?}");
        let all = s.decode_only();
        assert_eq!((all.steps, all.rows), (2, 5));
    }
}
