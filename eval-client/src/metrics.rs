//! lm-evaluation-harness's multiple-choice metrics: `acc` (argmax of summed loglikelihood) and
//! `acc_norm` (argmax of loglikelihood divided by the continuation's length in characters).

/// Index of the largest value, first on ties (numpy's argmax).
pub fn argmax(v: &[f64]) -> usize {
    let mut best = 0;
    for (i, &x) in v.iter().enumerate() {
        if x > v[best] {
            best = i;
        }
    }
    best
}

/// `(pred, pred_norm)` for one item's choice loglikelihoods and continuation strings.
pub fn predictions(lls: &[f64], continuations: &[String]) -> (usize, usize) {
    let norm: Vec<f64> = lls
        .iter()
        .zip(continuations)
        .map(|(ll, c)| ll / c.chars().count().max(1) as f64)
        .collect();
    (argmax(lls), argmax(&norm))
}

/// Mean of 0/1 outcomes.
pub fn mean(xs: &[bool]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.iter().filter(|x| **x).count() as f64 / xs.len() as f64
}

/// Mean of per-item scores (0 for none).
pub fn average(xs: &[f64]) -> f64 {
    if xs.is_empty() {
        return 0.0;
    }
    xs.iter().sum::<f64>() / xs.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn acc_and_acc_norm_as_lm_eval_computes_them() {
        // lm-eval: acc = argmax(lls); acc_norm = argmax(lls / len(continuation in characters)).
        let conts: Vec<String> = [" a", " much longer answer", " mid answer"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        let lls = [-4.0, -9.5, -6.0];
        // per char: -2.0, -0.5, -0.5454...
        assert_eq!(predictions(&lls, &conts), (0, 1));
        // Ties go to the first index, as numpy's argmax.
        assert_eq!(argmax(&[-1.0, -1.0]), 0);
        // Characters, not bytes: "é" is one character.
        let conts: Vec<String> = [" é", " ab"].iter().map(|s| s.to_string()).collect();
        assert_eq!(predictions(&[-3.0, -3.2], &conts), (0, 1));
        assert!((mean(&[true, false, true, true]) - 0.75).abs() < 1e-12);
    }
}
