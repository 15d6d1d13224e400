//! Opt-in attribution of engine time to phases of a step (`PRUNESERVE_PHASE_TIMES=1`). Each
//! phase is bracketed by device synchronizations, so per-phase figures are exact but steps run
//! slower (one sync pair per phase per layer): for profiling runs such as
//! `pruneserve bench --device cuda`, never for benchmark figures. Off, a phase is a plain call.

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::sync::LazyLock;
use std::time::{Duration, Instant};

use candle_core::Device;

static ENABLED: LazyLock<bool> = LazyLock::new(|| {
    std::env::var("PRUNESERVE_PHASE_TIMES").is_ok_and(|v| !v.is_empty() && v != "0")
});

/// Totals by (step kind, phase): seconds and calls.
type Totals = BTreeMap<(&'static str, &'static str), (Duration, usize)>;

thread_local! {
    static TOTALS: RefCell<Totals> = const { RefCell::new(BTreeMap::new()) };
    static STEP_KIND: RefCell<&'static str> = const { RefCell::new("step") };
}

pub fn enabled() -> bool {
    *ENABLED
}

/// Names the kind of the step now running ("decode" or "prefill"), the key of its phases.
pub fn set_step_kind(kind: &'static str) {
    if enabled() {
        STEP_KIND.with(|k| *k.borrow_mut() = kind);
    }
}

/// Runs `f` as phase `name` of the current step.
pub fn phase<T>(
    device: &Device,
    name: &'static str,
    f: impl FnOnce() -> candle_core::Result<T>,
) -> candle_core::Result<T> {
    if !enabled() {
        return f();
    }
    device.synchronize()?;
    let start = Instant::now();
    let out = f()?;
    device.synchronize()?;
    let elapsed = start.elapsed();
    let kind = STEP_KIND.with(|k| *k.borrow());
    TOTALS.with(|t| {
        let mut t = t.borrow_mut();
        let e = t.entry((kind, name)).or_default();
        e.0 += elapsed;
        e.1 += 1;
    });
    Ok(out)
}

/// The totals so far on this thread, as report lines (`kind phase: ms total, calls`), and
/// resets them.
pub fn take_report() -> Vec<String> {
    let totals = TOTALS.with(|t| std::mem::take(&mut *t.borrow_mut()));
    let mut by_kind: BTreeMap<&str, f64> = BTreeMap::new();
    for ((kind, _), (d, _)) in &totals {
        *by_kind.entry(kind).or_default() += d.as_secs_f64();
    }
    totals
        .iter()
        .map(|((kind, name), (d, calls))| {
            let s = d.as_secs_f64();
            format!(
                "{kind:>8} {name:<14} {:>9.2} ms {:>5.1}% {calls:>7} calls",
                1e3 * s,
                100.0 * s / by_kind[kind].max(1e-12)
            )
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_phase_returns_its_value_and_is_recorded_only_when_enabled() {
        set_step_kind("decode");
        let v = phase(&Device::Cpu, "x", || Ok(41 + 1)).unwrap();
        assert_eq!(v, 42);
        let report = take_report();
        if enabled() {
            assert_eq!(report.len(), 1);
            assert!(report[0].contains("decode x") && report[0].ends_with("1 calls"));
        } else {
            assert!(report.is_empty());
        }
    }
}
