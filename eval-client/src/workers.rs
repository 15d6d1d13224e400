//! A small worker pool: runs indexed jobs on N threads and returns their results in index order,
//! stopping a worker at its first error and reporting the first real error.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;

/// Runs `job(i)` for `i in 0..n` on `concurrency` threads. Results come back in index order; on
/// failure the first error (in index order) is returned, or `unfinished()` if jobs were left
/// undone without one.
pub fn run_indexed<T: Send, E: Send>(
    n: usize,
    concurrency: usize,
    job: impl Fn(usize) -> Result<T, E> + Sync,
    unfinished: impl FnOnce() -> E,
) -> Result<Vec<T>, E> {
    let slots: Mutex<Vec<Option<Result<T, E>>>> = Mutex::new((0..n).map(|_| None).collect());
    let next = AtomicUsize::new(0);
    std::thread::scope(|s| {
        for _ in 0..concurrency.max(1) {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::SeqCst);
                if i >= n {
                    break;
                }
                let r = job(i);
                let failed = r.is_err();
                if let Ok(mut v) = slots.lock() {
                    v[i] = Some(r);
                }
                if failed {
                    break;
                }
            });
        }
    });
    let mut out = Vec::with_capacity(n);
    let mut missing = false;
    for slot in slots.into_inner().unwrap_or_default() {
        match slot {
            Some(r) => out.push(r?),
            None => missing = true,
        }
    }
    if missing {
        return Err(unfinished());
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_order_and_reports_the_first_error() {
        let ok: Result<Vec<usize>, String> = run_indexed(50, 4, |i| Ok(i * 2), || "left".into());
        assert_eq!(ok.unwrap(), (0..50).map(|i| i * 2).collect::<Vec<_>>());
        let err: Result<Vec<usize>, String> = run_indexed(
            50,
            1,
            |i| {
                if i == 3 {
                    Err(format!("job {i}"))
                } else {
                    Ok(i)
                }
            },
            || "left".into(),
        );
        assert_eq!(err.unwrap_err(), "job 3");
    }
}
