//! Incremental detokenizing with stop strings: each generated id costs a decode of a few ids
//! (the tokenizers crate's `DecodeStream` step), not of the whole output.
//!
//! Contract: the text released by [`IncrementalText::push`] and [`IncrementalText::finish`],
//! concatenated, equals `tokenizer.decode(all ids, false)` cut before the first stop string; text
//! that may still become a stop string (a suffix that is a prefix of one), or that ends inside a
//! multi-byte character, is held back until the next id decides it.

use std::sync::Arc;

use tokenizers::tokenizer::step_decode_stream;
use tokenizers::Tokenizer;

/// What one new id released.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct TextStep {
    /// Text that is now final (may be empty).
    pub delta: String,
    /// A stop string completed; the text ends before it and no more text follows.
    pub stopped: bool,
}

pub struct IncrementalText {
    tokenizer: Arc<Tokenizer>,
    /// `DecodeStream`'s window state (see `tokenizers::tokenizer::step_decode_stream`).
    window: Vec<u32>,
    prefix: String,
    prefix_index: usize,
    /// Everything decoded so far, and how much of it was released.
    text: String,
    sent: usize,
    stops: Vec<String>,
    longest_stop: usize,
}

/// Byte length of the longest suffix of `text` that is a proper prefix of some stop string.
fn held_back(text: &str, stops: &[String]) -> usize {
    let mut hold = 0;
    for stop in stops {
        let most = (stop.len() - 1).min(text.len());
        for i in (hold + 1..=most).rev() {
            if stop.is_char_boundary(i) && text.ends_with(&stop[..i]) {
                hold = i;
                break;
            }
        }
    }
    hold
}

/// The largest char boundary of `s` at or below `i`.
fn floor_boundary(s: &str, i: usize) -> usize {
    (0..=i.min(s.len()))
        .rev()
        .find(|&j| s.is_char_boundary(j))
        .unwrap_or(0)
}

impl IncrementalText {
    /// `stops` must be non-empty strings.
    pub fn new(tokenizer: Arc<Tokenizer>, stops: Vec<String>) -> Self {
        let longest_stop = stops.iter().map(String::len).max().unwrap_or(0);
        Self {
            tokenizer,
            window: Vec::new(),
            prefix: String::new(),
            prefix_index: 0,
            text: String::new(),
            sent: 0,
            stops,
            longest_stop,
        }
    }

    /// Feeds one generated id.
    pub fn push(&mut self, id: u32) -> TextStep {
        let decoded = step_decode_stream(
            &self.tokenizer,
            vec![id],
            false,
            &mut self.window,
            &mut self.prefix,
            &mut self.prefix_index,
        );
        match decoded {
            Ok(Some(new)) => self.text.push_str(&new),
            Ok(None) => {}
            // The window no longer decodes to an extension of its prefix (a tokenizer whose
            // decoder rewrites earlier text): restart the window at this id.
            Err(_) => {
                self.window = vec![id];
                self.prefix.clear();
                self.prefix_index = 0;
                let fresh = self
                    .tokenizer
                    .decode(&self.window, false)
                    .unwrap_or_default();
                if !fresh.ends_with('\u{FFFD}') {
                    self.prefix = fresh.clone();
                    self.prefix_index = 1;
                    self.text.push_str(&fresh);
                }
            }
        }
        self.release(false)
    }

    /// Releases whatever is left (held-back text and an unfinished character) at the end.
    pub fn finish(&mut self) -> String {
        if let Ok(all) = self.tokenizer.decode(&self.window, false) {
            if let Some(rest) = all.strip_prefix(self.prefix.as_str()) {
                self.text.push_str(rest);
            }
        }
        self.release(true).delta
    }

    fn release(&mut self, at_end: bool) -> TextStep {
        let from = floor_boundary(&self.text, self.sent.saturating_sub(self.longest_stop));
        let hit = self
            .stops
            .iter()
            .filter_map(|s| self.text[from..].find(s.as_str()).map(|p| p + from))
            .min();
        if let Some(end) = hit {
            let end = end.max(self.sent);
            let delta = self.text[self.sent..end].to_string();
            self.sent = end;
            self.text.truncate(end);
            self.stops.clear();
            return TextStep {
                delta,
                stopped: true,
            };
        }
        let safe = if at_end {
            self.text.len()
        } else {
            self.text.len() - held_back(&self.text, &self.stops)
        };
        let delta = if safe > self.sent {
            self.text[self.sent..safe].to_string()
        } else {
            String::new()
        };
        self.sent = self.sent.max(safe);
        TextStep {
            delta,
            stopped: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn byte_tokenizer() -> Arc<Tokenizer> {
        // The built-in byte-level tokenizer: bytes above 0x7f make a character span several ids.
        let json = crate::checkpoint::random_init::byte_tokenizer_json().to_string();
        Arc::new(json.parse().unwrap())
    }

    fn run(tok: &Arc<Tokenizer>, ids: &[u32], stops: &[&str]) -> (Vec<String>, bool) {
        let mut t =
            IncrementalText::new(tok.clone(), stops.iter().map(|s| s.to_string()).collect());
        let mut deltas = Vec::new();
        for &id in ids {
            let s = t.push(id);
            deltas.push(s.delta);
            if s.stopped {
                return (deltas, true);
            }
        }
        deltas.push(t.finish());
        (deltas, false)
    }

    #[test]
    fn released_text_equals_a_whole_decode() {
        let tok = byte_tokenizer();
        let text = "héllo wörld — ✓ done";
        let ids = tok.encode(text, false).unwrap().get_ids().to_vec();
        let (deltas, stopped) = run(&tok, &ids, &[]);
        assert!(!stopped);
        assert_eq!(deltas.concat(), tok.decode(&ids, false).unwrap());
        assert_eq!(deltas.concat(), text);
        // No delta ever splits a character.
        assert!(deltas.iter().all(|d| !d.contains('\u{FFFD}')));
    }

    #[test]
    fn stops_cut_the_text_and_hold_back_possible_starts() {
        let tok = byte_tokenizer();
        let ids = tok
            .encode("one\n\nQuestion: two", false)
            .unwrap()
            .get_ids()
            .to_vec();
        let (deltas, stopped) = run(&tok, &ids, &["Question:", "zzz"]);
        assert!(stopped);
        assert_eq!(deltas.concat(), "one\n\n");
        // "Q", "Qu", ... were held back, never released then retracted.
        assert!(deltas.iter().all(|d| !d.contains('Q')));
        // A near miss is released at the end.
        let ids = tok
            .encode("ends with Quest", false)
            .unwrap()
            .get_ids()
            .to_vec();
        let (deltas, stopped) = run(&tok, &ids, &["Question:"]);
        assert!(!stopped);
        assert_eq!(deltas.last().unwrap(), "Quest");
        assert_eq!(deltas.concat(), "ends with Quest");
    }

    #[test]
    fn held_back_finds_the_longest_stop_prefix() {
        let stops = vec!["abc".to_string(), "xx".to_string()];
        assert_eq!(held_back("zzab", &stops), 2);
        assert_eq!(held_back("zzx", &stops), 1);
        assert_eq!(held_back("abc", &stops), 0);
        assert_eq!(held_back("", &stops), 0);
    }
}
