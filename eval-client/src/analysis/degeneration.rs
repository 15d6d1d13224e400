//! Degeneration of generated text, as the paper measures it.
//!
//! - rep-n = 100 · mean over responses of (1 − unique n-grams / total n-grams), n = 2, 3, 4, over
//!   lowercased whitespace-separated words; a response with fewer than n words has no n-grams and
//!   is left out of that n's mean.
//! - Intra-response Self-BLEU-4 = 100 · mean over responses of the mean BLEU-4 of each sentence of
//!   ≥ 4 words against the response's other sentences (nltk's `sentence_bleu`, uniform weights,
//!   `SmoothingFunction().method1`: a zero n-gram match count becomes 0.1); sentences are split
//!   after `.`, `!`, `?` and at newlines. A response with fewer than two sentences has none.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

/// A model's degeneration figures over a task's responses (`None`: no response qualified).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Degeneration {
    pub rep_2: Option<f64>,
    pub rep_3: Option<f64>,
    pub rep_4: Option<f64>,
    pub self_bleu_4: Option<f64>,
    pub responses: usize,
}

/// Lowercased whitespace-separated words.
pub fn words(text: &str) -> Vec<String> {
    text.split_whitespace().map(str::to_lowercase).collect()
}

/// `1 − unique / total` n-grams of one response, or `None` with fewer than `n` words.
pub fn repetition(words: &[String], n: usize) -> Option<f64> {
    if n == 0 || words.len() < n {
        return None;
    }
    let grams: Vec<&[String]> = words.windows(n).collect();
    let unique: std::collections::HashSet<&[String]> = grams.iter().copied().collect();
    Some(1.0 - unique.len() as f64 / grams.len() as f64)
}

/// Sentences: split after `.`, `!`, `?` and at line breaks, blank ones dropped.
pub fn sentences(text: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut current = String::new();
    for c in text.chars() {
        if c == '\n' {
            out.push(std::mem::take(&mut current));
            continue;
        }
        current.push(c);
        if matches!(c, '.' | '!' | '?') {
            out.push(std::mem::take(&mut current));
        }
    }
    out.push(current);
    out.into_iter().filter(|s| !s.trim().is_empty()).collect()
}

fn ngram_counts(tokens: &[String], n: usize) -> HashMap<&[String], usize> {
    let mut m = HashMap::new();
    for g in tokens.windows(n) {
        *m.entry(g).or_insert(0) += 1;
    }
    m
}

/// nltk's `sentence_bleu(references, hypothesis, smoothing_function=method1)` with weights
/// (0.25, 0.25, 0.25, 0.25).
pub fn sentence_bleu4(references: &[Vec<String>], hypothesis: &[String]) -> f64 {
    let mut log_sum = 0.0;
    for n in 1..=4 {
        let hyp = ngram_counts(hypothesis, n);
        let mut max_ref: HashMap<&[String], usize> = HashMap::new();
        for r in references {
            for (g, c) in ngram_counts(r, n) {
                let e = max_ref.entry(g).or_insert(0);
                *e = (*e).max(c);
            }
        }
        let matched: usize = hyp
            .iter()
            .map(|(g, &c)| c.min(max_ref.get(g).copied().unwrap_or(0)))
            .sum();
        let total = hyp.values().sum::<usize>().max(1);
        if n == 1 && matched == 0 {
            return 0.0;
        }
        let p = if matched == 0 {
            0.1 / total as f64
        } else {
            matched as f64 / total as f64
        };
        log_sum += 0.25 * p.ln();
    }
    // Brevity penalty against the closest reference length (the shorter on ties).
    let c = hypothesis.len();
    let r = references
        .iter()
        .map(Vec::len)
        .min_by_key(|&l| (l.abs_diff(c), l))
        .unwrap_or(0);
    let bp = if c > r {
        1.0
    } else if c == 0 {
        0.0
    } else {
        (1.0 - r as f64 / c as f64).exp()
    };
    bp * log_sum.exp()
}

/// Mean BLEU-4 of the response's sentences of ≥ 4 words against its other sentences.
pub fn intra_self_bleu4(text: &str) -> Option<f64> {
    let sents: Vec<Vec<String>> = sentences(text).iter().map(|s| words(s)).collect();
    if sents.len() < 2 {
        return None;
    }
    let scores: Vec<f64> = (0..sents.len())
        .filter(|&i| sents[i].len() >= 4)
        .map(|i| {
            let refs: Vec<Vec<String>> = sents
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, s)| s.clone())
                .collect();
            sentence_bleu4(&refs, &sents[i])
        })
        .collect();
    (!scores.is_empty()).then(|| scores.iter().sum::<f64>() / scores.len() as f64)
}

fn mean_percent(values: impl Iterator<Item = Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = values.flatten().collect();
    (!v.is_empty()).then(|| 100.0 * v.iter().sum::<f64>() / v.len() as f64)
}

/// The figures over a set of responses.
pub fn degeneration<'a>(responses: impl Iterator<Item = &'a str> + Clone) -> Degeneration {
    let tokenized: Vec<Vec<String>> = responses.clone().map(words).collect();
    let rep = |n| mean_percent(tokenized.iter().map(|w| repetition(w, n)));
    Degeneration {
        rep_2: rep(2),
        rep_3: rep(3),
        rep_4: rep(4),
        self_bleu_4: mean_percent(responses.map(intra_self_bleu4)),
        responses: tokenized.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn repetition_counts_repeated_ngrams() {
        let w = words("The cat the cat THE cat");
        // bigrams: the cat, cat the, the cat, cat the, the cat -> 2 unique of 5.
        assert!((repetition(&w, 2).unwrap() - 0.6).abs() < 1e-12);
        assert_eq!(repetition(&w[..1], 2), None);
    }

    #[test]
    fn sentences_split_at_stops_and_newlines() {
        assert_eq!(
            sentences("One. Two!\nThree? four"),
            vec!["One.", " Two!", "Three?", " four"]
        );
    }

    #[test]
    fn identical_sentences_score_one() {
        let s = words("the answer is four here");
        assert!((sentence_bleu4(std::slice::from_ref(&s), &s) - 1.0).abs() < 1e-12);
    }
}
