//! Multiple choice in one forward per item, where that gives the same answer as scoring every
//! choice: all choices share the context, their continuations are one shared prefix plus one
//! distinct last token each, and they are equally long in characters (the arithmetic probe's
//! ` 0`..` 9`, MMLU's ` A`..` D`). One request scores context + prefix with `echo` and the next
//! token's top 20: a choice's loglikelihood is the prefix's plus its token's logprob, exact for
//! every choice in the top 20; the best choice is always among them when any is. An item where no
//! choice reaches the top 20 is scored in full instead.
//!
//! Tokens are matched to top-20 entries by their text (the server keys `top_logprobs` by each
//! token's decoded text, as `/detokenize` spells it).

use std::collections::HashMap;
use std::sync::Mutex;

use serde_json::{json, Value};

use crate::client::{Client, ClientError};
use crate::loglikelihood::{encode_pair, tokenize};
use crate::tasks::Doc;

/// Alternatives the server returns per position (its `logprobs` limit).
const TOP: usize = 20;

/// A doc in the one-forward shape.
#[derive(Debug, Clone, PartialEq)]
pub struct SharedShape {
    /// Context then the continuations' shared prefix.
    pub prompt: Vec<u32>,
    pub context_len: usize,
    /// Each choice's last token.
    pub last: Vec<u32>,
}

/// The doc's one-forward shape, if it has one.
pub fn shape(
    doc: &Doc,
    encode: impl Fn(&str) -> Result<Vec<u32>, ClientError>,
) -> Result<Option<SharedShape>, ClientError> {
    let first = &doc.contexts[0];
    let width = doc.continuations[0].chars().count();
    if doc.contexts.iter().any(|c| c != first)
        || doc.continuations.iter().any(|c| c.chars().count() != width)
    {
        return Ok(None);
    }
    let mut pairs = Vec::with_capacity(doc.continuations.len());
    for cont in &doc.continuations {
        pairs.push(encode_pair(first, cont, &encode)?);
    }
    let ctx = &pairs[0].0;
    let prefix = &pairs[0].1[..pairs[0].1.len().saturating_sub(1)];
    let mut last = Vec::with_capacity(pairs.len());
    for (c, x) in &pairs {
        match x.split_last() {
            Some((&t, head)) if c == ctx && head == prefix && !last.contains(&t) => last.push(t),
            _ => return Ok(None),
        }
    }
    Ok(Some(SharedShape {
        prompt: ctx.iter().chain(prefix).copied().collect(),
        context_len: ctx.len(),
        last,
    }))
}

/// Token texts as the server spells them in `top_logprobs`, fetched once per token through one
/// model (every model scored with them shares its tokenizer, and the requests stay the same from
/// run to run, so the client's cache answers a rerun).
pub struct TokenTexts {
    model: String,
    texts: Mutex<HashMap<u32, String>>,
}

impl TokenTexts {
    pub fn new(model: &str) -> Self {
        Self {
            model: model.to_string(),
            texts: Mutex::default(),
        }
    }

    pub fn get(&self, client: &Client, id: u32) -> Result<String, ClientError> {
        if let Some(t) = self.texts.lock().ok().and_then(|m| m.get(&id).cloned()) {
            return Ok(t);
        }
        let v = client.post("/detokenize", &json!({"model": self.model, "tokens": [id]}))?;
        let text = v["prompt"]
            .as_str()
            .ok_or_else(|| ClientError::Invalid {
                url: "/detokenize".into(),
                message: "no prompt".into(),
            })?
            .to_string();
        if let Ok(mut m) = self.texts.lock() {
            m.insert(id, text.clone());
        }
        Ok(text)
    }
}

/// Each choice's loglikelihood (`f64::MIN` below the top 20), or `None` when no choice is in it
/// or the server gave no alternatives for the next position.
pub fn score(
    client: &Client,
    model: &str,
    shape: &SharedShape,
    texts: &TokenTexts,
) -> Result<Option<Vec<f64>>, ClientError> {
    let body = json!({"model": model, "prompt": [shape.prompt], "echo": true,
        "max_tokens": 1, "logprobs": TOP, "temperature": 0, "ignore_eos": true});
    let v = client.post("/v1/completions", &body)?;
    let invalid = |message: &str| ClientError::Invalid {
        url: "/v1/completions".into(),
        message: message.into(),
    };
    let lp = &v["choices"][0]["logprobs"];
    let token_logprobs = lp["token_logprobs"]
        .as_array()
        .ok_or_else(|| invalid("no token_logprobs"))?;
    let prefix: f64 = (shape.context_len..shape.prompt.len())
        .map(|i| token_logprobs.get(i).and_then(Value::as_f64))
        .sum::<Option<f64>>()
        .ok_or_else(|| invalid("missing prefix logprobs"))?;
    // A greedy end of sequence may come back without its position (servers that do not honour
    // `ignore_eos`): that item is scored in full.
    let Some(next) = lp["top_logprobs"]
        .get(shape.prompt.len())
        .and_then(Value::as_object)
    else {
        return Ok(None);
    };
    let mut lls = Vec::with_capacity(shape.last.len());
    for &t in &shape.last {
        let text = texts.get(client, t)?;
        lls.push(
            next.get(&text)
                .and_then(Value::as_f64)
                .map_or(f64::MIN, |l| prefix + l),
        );
    }
    Ok(lls.iter().any(|&l| l > f64::MIN).then_some(lls))
}

/// Scores what it can in one forward per doc; `None` for docs to score in full.
pub fn score_docs(
    client: &Client,
    model: &str,
    docs: &[Doc],
    concurrency: usize,
    on_done: &(dyn Fn(usize) + Sync),
) -> Result<Vec<Option<Vec<f64>>>, ClientError> {
    let models = [model.to_string()];
    let mut per_model = score_docs_together(client, &models, docs, concurrency, on_done)?;
    Ok(per_model.pop().unwrap_or_default())
}

/// [`score_docs`] for several models of one tokenizer (plans of one base) at once: each doc's
/// requests for all models are sent together, so a server that shares work between plans fed
/// the same prompt in one step can (pruneserve's shared hidden states). Per model, per doc.
pub fn score_docs_together(
    client: &Client,
    models: &[String],
    docs: &[Doc],
    concurrency: usize,
    on_done: &(dyn Fn(usize) + Sync),
) -> Result<Vec<Vec<Option<Vec<f64>>>>, ClientError> {
    let Some(first) = models.first() else {
        return Ok(Vec::new());
    };
    let texts = TokenTexts::new(first);
    let per_doc = crate::workers::run_indexed(
        docs.len(),
        concurrency,
        |i| {
            let Some(s) = shape(&docs[i], |t| tokenize(client, first, t))? else {
                return Ok(vec![None; models.len()]);
            };
            let scored = std::thread::scope(|scope| {
                let running: Vec<_> = models
                    .iter()
                    .map(|m| {
                        let (s, texts) = (&s, &texts);
                        scope.spawn(move || score(client, m, s, texts))
                    })
                    .collect();
                running
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err(not_scored())))
                    .collect::<Result<Vec<_>, _>>()
            })?;
            let done = scored.iter().filter(|r| r.is_some()).count();
            on_done(done * docs[i].continuations.len());
            Ok(scored)
        },
        not_scored,
    )?;
    Ok((0..models.len())
        .map(|m| per_doc.iter().map(|d| d[m].clone()).collect())
        .collect())
}

fn not_scored() -> ClientError {
    ClientError::Invalid {
        url: "/v1/completions".into(),
        message: "an item was not scored".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(ctx: &str, conts: &[&str]) -> Doc {
        Doc {
            contexts: vec![ctx.to_string(); conts.len()],
            continuations: conts.iter().map(|c| c.to_string()).collect(),
            gold: 0,
        }
    }

    /// One token per character, except that a space and a digit fuse into one token.
    fn enc(t: &str) -> Result<Vec<u32>, ClientError> {
        let mut out = Vec::new();
        let mut chars = t.chars().peekable();
        while let Some(c) = chars.next() {
            match (c, chars.peek()) {
                (' ', Some(d)) if d.is_ascii_digit() => {
                    out.push(1000 + d.to_digit(10).unwrap_or(0));
                    chars.next();
                }
                _ => out.push(c as u32),
            }
        }
        Ok(out)
    }

    #[test]
    fn digit_choices_share_the_context() {
        let s = shape(&doc("Answer:", &[" 1", " 2"]), enc).unwrap().unwrap();
        assert_eq!(
            s.prompt,
            "Answer:".chars().map(|c| c as u32).collect::<Vec<_>>()
        );
        assert_eq!(s.last, vec![1001, 1002]);
        // Without the fused space, the space is the shared prefix.
        let s = shape(&doc("Answer:", &[" a", " b"]), enc).unwrap().unwrap();
        assert_eq!(s.prompt.last(), Some(&(' ' as u32)));
        assert_eq!(s.last, vec!['a' as u32, 'b' as u32]);
    }

    #[test]
    fn other_shapes_are_scored_in_full() {
        assert_eq!(shape(&doc("Q:", &[" ab", " b"]), enc).unwrap(), None);
        assert_eq!(shape(&doc("Q:", &[" ab", " cd"]), enc).unwrap(), None);
        assert_eq!(shape(&doc("Q:", &[" a", " a"]), enc).unwrap(), None);
        let mut d = doc("Q:", &[" a", " b"]);
        d.contexts[1] = "R:".into();
        assert_eq!(shape(&d, enc).unwrap(), None);
    }
}
