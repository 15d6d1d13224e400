//! Loglikelihood requests as lm-evaluation-harness's `local-completions` sends them: token-id
//! prompts (context + continuation, tokenized by the server's `/tokenize`), `echo`, `logprobs: 1`,
//! `max_tokens: 1`, `temperature: 0`; the score is the sum of the continuation tokens' logprobs and
//! greediness comes from `top_logprobs`.

use serde_json::{json, Value};

use crate::client::{Client, ClientError};
use crate::workers::run_indexed;

/// lm-eval's `_encode_pair`: trailing spaces of the context move to the continuation, and the
/// continuation tokens are those of `context + continuation` past the context's tokens.
pub fn encode_pair<E>(
    context: &str,
    continuation: &str,
    encode: E,
) -> Result<(Vec<u32>, Vec<u32>), ClientError>
where
    E: Fn(&str) -> Result<Vec<u32>, ClientError>,
{
    let trimmed = context.trim_end();
    let moved = &context[trimmed.len()..];
    let continuation = format!("{moved}{continuation}");
    let whole = encode(&format!("{trimmed}{continuation}"))?;
    let ctx = encode(trimmed)?;
    let cont = whole.get(ctx.len()..).unwrap_or_default().to_vec();
    Ok((ctx, cont))
}

/// Loglikelihood and greediness of one continuation.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Score {
    pub loglikelihood: f64,
    pub is_greedy: bool,
}

pub(crate) fn tokenize(client: &Client, model: &str, text: &str) -> Result<Vec<u32>, ClientError> {
    let v = client.post(
        "/tokenize",
        &json!({"model": model, "prompt": text, "add_special_tokens": false}),
    )?;
    serde_json::from_value(v["tokens"].clone()).map_err(|e| ClientError::Invalid {
        url: "/tokenize".into(),
        message: e.to_string(),
    })
}

/// Reads one choice of a completions response.
pub fn score_choice(choice: &Value, ctx_len: usize, cont_len: usize) -> Result<Score, String> {
    let lp = &choice["logprobs"];
    let token_logprobs = lp["token_logprobs"].as_array().ok_or("no token_logprobs")?;
    let tokens = lp["tokens"].as_array().ok_or("no tokens")?;
    let tops = lp["top_logprobs"].as_array().ok_or("no top_logprobs")?;
    let mut ll = 0.0;
    let mut greedy = true;
    for i in ctx_len..ctx_len + cont_len {
        ll += token_logprobs
            .get(i)
            .and_then(Value::as_f64)
            .ok_or("missing logprob")?;
        let top = tops
            .get(i)
            .and_then(Value::as_object)
            .ok_or("missing top_logprobs")?;
        let best = top.iter().max_by(|a, b| {
            a.1.as_f64()
                .unwrap_or(f64::MIN)
                .total_cmp(&b.1.as_f64().unwrap_or(f64::MIN))
        });
        if best.map(|(k, _)| k.as_str()) != tokens.get(i).and_then(Value::as_str) {
            greedy = false;
        }
    }
    Ok(Score {
        loglikelihood: ll,
        is_greedy: greedy,
    })
}

/// Scores `(context, continuation)` pairs, `batch` prompts per request, `concurrency` requests
/// in flight. Results are in input order.
pub fn score_pairs(
    client: &Client,
    model: &str,
    pairs: &[(String, String)],
    batch: usize,
    concurrency: usize,
    on_scored: &(dyn Fn(usize) + Sync),
) -> Result<Vec<Score>, ClientError> {
    let encoded = pairs
        .iter()
        .map(|(c, x)| encode_pair(c, x, |t| tokenize(client, model, t)))
        .collect::<Result<Vec<_>, _>>()?;
    let chunks: Vec<&[(Vec<u32>, Vec<u32>)]> = encoded.chunks(batch.max(1)).collect();
    let scored = run_indexed(
        chunks.len(),
        concurrency,
        |i| {
            let r = score_chunk(client, model, chunks[i]);
            on_scored(chunks[i].len());
            r
        },
        || ClientError::Invalid {
            url: "/v1/completions".into(),
            message: "a batch was not scored".into(),
        },
    )?;
    Ok(scored.into_iter().flatten().collect())
}

fn score_chunk(
    client: &Client,
    model: &str,
    chunk: &[(Vec<u32>, Vec<u32>)],
) -> Result<Vec<Score>, ClientError> {
    let prompts: Vec<Vec<u32>> = chunk
        .iter()
        .map(|(c, x)| c.iter().chain(x).copied().collect())
        .collect();
    let body = json!({"model": model, "prompt": prompts, "echo": true, "max_tokens": 1, "logprobs": 1, "temperature": 0});
    let v = client.post("/v1/completions", &body)?;
    let invalid = |message: String| ClientError::Invalid {
        url: "/v1/completions".into(),
        message,
    };
    let choices = v["choices"]
        .as_array()
        .ok_or_else(|| invalid("no choices".into()))?;
    chunk
        .iter()
        .enumerate()
        .map(|(i, (c, x))| {
            let choice = choices
                .iter()
                .find(|ch| ch["index"].as_u64() == Some(i as u64))
                .ok_or_else(|| invalid(format!("no choice {i}")))?;
            score_choice(choice, c.len(), x.len()).map_err(&invalid)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encode_pair_moves_trailing_space_and_splits_on_the_whole_encoding() {
        // A toy tokenizer: one token per character.
        let enc = |t: &str| Ok::<_, ClientError>(t.chars().map(|c| c as u32).collect());
        let (ctx, cont) = encode_pair("Q: a? A: ", "b", enc).unwrap();
        assert_eq!(
            ctx,
            "Q: a? A:".chars().map(|c| c as u32).collect::<Vec<_>>()
        );
        assert_eq!(cont, vec![' ' as u32, 'b' as u32]);
    }

    #[test]
    fn scores_a_legacy_choice() {
        let choice = json!({"logprobs": {
            "tokens": ["a", "b", "c", "d"],
            "token_logprobs": [null, -1.0, -0.5, -2.0],
            "top_logprobs": [null, {"b": -1.0}, {"x": -0.1, "c": -0.5}, {"d": -2.0}]}});
        let s = score_choice(&choice, 2, 1).unwrap();
        assert_eq!(
            s,
            Score {
                loglikelihood: -0.5,
                is_greedy: false
            }
        );
        let s = score_choice(&choice, 1, 1).unwrap();
        assert_eq!(
            s,
            Score {
                loglikelihood: -1.0,
                is_greedy: true
            }
        );
    }
}
