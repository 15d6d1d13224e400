//! Where engine time goes under load: step wall time by kind (decode-only steps vs steps with
//! prefill rows), with rows per step, logged at info level every 10 s while steps run.

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
}

const REPORT_EVERY: Duration = Duration::from_secs(10);

impl Default for StepStats {
    fn default() -> Self {
        Self {
            window_start: Instant::now(),
            decode_only: Totals::default(),
            with_prefill: Totals::default(),
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
        if self.window_start.elapsed() >= REPORT_EVERY {
            tracing::info!(
                decode_only = %self.decode_only.describe(),
                with_prefill = %self.with_prefill.describe(),
                "engine steps in the last {:.0} s",
                self.window_start.elapsed().as_secs_f64()
            );
            *self = Self::default();
        }
    }
}
