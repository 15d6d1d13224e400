//! SGR output, exactly once whatever happens: the training file (OpenAI's chat format, one
//! `{"messages": [...]}` per kept record) and beside it a provenance file with one line per
//! (source row, sample) key, kept or dropped. Both are append-only and written in the prompts'
//! order (results that finish early wait in a reorder buffer), so a seeded run writes the same
//! bytes whether it was interrupted or not.
//!
//! The provenance line commits a position: a record's training line is written before its
//! provenance line, so after a `kill -9` a resumed run truncates a torn last line of either file,
//! and a training line whose provenance never landed, and goes on from the first position not
//! committed.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::SgrError;

/// One (row, sample) key's provenance line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Provenance {
    pub row: usize,
    pub sample: usize,
    /// `kept`, `dropped_length` or `dropped_empty`.
    pub status: String,
    pub model: String,
    /// Base layers the model runs (from the server's `/v1/models`).
    pub kept_layers: Vec<usize>,
    pub sampling: Value,
    pub seed: u64,
    pub finish_reason: String,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
}

/// A finished prompt: one training line (when kept) and one provenance line per sample.
#[derive(Debug, Clone)]
pub struct Finished {
    pub lines: Vec<(Option<Value>, Provenance)>,
}

/// The provenance file beside a training file.
pub fn provenance_path(out: &Path) -> PathBuf {
    let mut name = out.file_name().unwrap_or_default().to_os_string();
    name.push(".provenance.jsonl");
    out.with_file_name(name)
}

/// Complete lines of a file (a torn last line is dropped), and the byte length they take.
fn complete_lines(path: &Path) -> Result<(Vec<String>, u64), SgrError> {
    let file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok((Vec::new(), 0)),
        Err(e) => return Err(SgrError::io(path, e)),
    };
    let mut reader = BufReader::new(file);
    let (mut lines, mut len) = (Vec::new(), 0u64);
    loop {
        let mut line = String::new();
        let n = reader
            .read_line(&mut line)
            .map_err(|e| SgrError::io(path, e))?;
        if n == 0 || !line.ends_with('\n') {
            return Ok((lines, len));
        }
        len += n as u64;
        line.pop();
        lines.push(line);
    }
}

/// Truncates `path` to `len` bytes (dropping what follows the last committed line).
fn truncate(path: &Path, len: u64) -> Result<(), SgrError> {
    if !path.exists() {
        return Ok(());
    }
    let file = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(|e| SgrError::io(path, e))?;
    file.set_len(len).map_err(|e| SgrError::io(path, e))
}

/// Appends finished prompts in order; `next` is the position written next.
pub struct OrderedWriter {
    out: File,
    provenance: File,
    paths: (PathBuf, PathBuf),
    next: usize,
    pending: BTreeMap<usize, Finished>,
}

impl OrderedWriter {
    /// Opens `out` (and its provenance file) to continue a run whose prompt positions have the
    /// keys `keys(position)` with `samples` samples each: committed positions are checked against
    /// them and kept; anything torn or uncommitted is cut off. Returns the writer and the
    /// committed provenance lines.
    pub fn resume(
        out: &Path,
        samples: usize,
        row_of: impl Fn(usize) -> Option<usize>,
    ) -> Result<(Self, Vec<Provenance>), SgrError> {
        let prov_path = provenance_path(out);
        let (prov_lines, _) = complete_lines(&prov_path)?;
        let mut committed: Vec<Provenance> = Vec::new();
        let mut prov_len = 0u64;
        let mut kept = 0usize;
        let (out_lines, _) = complete_lines(out)?;
        // Whole positions only: all `samples` lines of a prompt, each with its training line.
        for chunk in prov_lines.chunks(samples) {
            let parsed: Vec<Provenance> = chunk
                .iter()
                .map(|l| serde_json::from_str(l))
                .collect::<Result<_, _>>()
                .map_err(|e| SgrError::Input(format!("{}: {e}", prov_path.display())))?;
            let position = committed.len() / samples;
            let expected = row_of(position);
            let whole = parsed.len() == samples
                && parsed
                    .iter()
                    .enumerate()
                    .all(|(k, p)| Some(p.row) == expected && p.sample == k);
            if !whole {
                if parsed.len() == samples {
                    return Err(SgrError::Input(format!(
                        "{} was written by another run (position {position} holds row {}, this run's is {expected:?}): use a new --out, or the same data, --seed, --limit and --n",
                        prov_path.display(),
                        parsed[0].row
                    )));
                }
                break;
            }
            let kept_here = parsed.iter().filter(|p| p.status == "kept").count();
            if kept + kept_here > out_lines.len() {
                break;
            }
            kept += kept_here;
            prov_len += chunk.iter().map(|l| l.len() as u64 + 1).sum::<u64>();
            committed.extend(parsed);
        }
        let out_len: u64 = out_lines[..kept].iter().map(|l| l.len() as u64 + 1).sum();
        truncate(out, out_len)?;
        truncate(&prov_path, prov_len)?;
        let open = |p: &Path| {
            OpenOptions::new()
                .create(true)
                .append(true)
                .open(p)
                .map_err(|e| SgrError::io(p, e))
        };
        let writer = Self {
            out: open(out)?,
            provenance: open(&prov_path)?,
            next: committed.len() / samples,
            paths: (out.to_path_buf(), prov_path),
            pending: BTreeMap::new(),
        };
        Ok((writer, committed))
    }

    /// The first position not yet written.
    pub fn next_position(&self) -> usize {
        self.next
    }

    /// Takes the result of `position`; writes it and every following one already here.
    pub fn put(&mut self, position: usize, done: Finished) -> Result<Vec<Provenance>, SgrError> {
        self.pending.insert(position, done);
        let mut written = Vec::new();
        while let Some(done) = self.pending.remove(&self.next) {
            for (line, prov) in done.lines {
                if let Some(line) = line {
                    writeln!(self.out, "{line}").map_err(|e| SgrError::io(&self.paths.0, e))?;
                }
                let text = serde_json::to_string(&prov)
                    .map_err(|e| SgrError::Input(format!("provenance: {e}")))?;
                // The training line first: the provenance line commits the pair.
                self.out
                    .flush()
                    .map_err(|e| SgrError::io(&self.paths.0, e))?;
                writeln!(self.provenance, "{text}").map_err(|e| SgrError::io(&self.paths.1, e))?;
                written.push(prov);
            }
            self.next += 1;
        }
        Ok(written)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn finished(row: usize, keep: bool) -> Finished {
        let prov = Provenance {
            row,
            sample: 0,
            status: if keep { "kept" } else { "dropped_length" }.into(),
            model: "m".into(),
            kept_layers: vec![0, 1],
            sampling: json!({"temperature": 0.9}),
            seed: 1,
            finish_reason: if keep { "stop" } else { "length" }.into(),
            prompt_tokens: 3,
            completion_tokens: 4,
        };
        let line =
            keep.then(|| json!({"messages": [{"role": "user", "content": format!("q{row}")}]}));
        Finished {
            lines: vec![(line, prov)],
        }
    }

    #[test]
    fn results_are_written_in_order_and_resume_cuts_torn_lines() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("sgr.jsonl");
        let rows = [10, 11, 12, 13, 14];
        let row_of = |p: usize| rows.get(p).copied();
        let (mut w, done) = OrderedWriter::resume(&out, 1, row_of).unwrap();
        assert!(done.is_empty());
        assert!(w.put(1, finished(11, false)).unwrap().is_empty());
        assert_eq!(w.put(0, finished(10, true)).unwrap().len(), 2);
        w.put(2, finished(12, true)).unwrap();
        drop(w);
        // A crash: a torn provenance line, and a training line whose provenance never landed.
        let prov = provenance_path(&out);
        OpenOptions::new()
            .append(true)
            .open(&prov)
            .unwrap()
            .write_all(b"{\"row\": 13, \"sam")
            .unwrap();
        OpenOptions::new()
            .append(true)
            .open(&out)
            .unwrap()
            .write_all(b"{\"messages\": [13]}\n{\"mess")
            .unwrap();
        let (mut w, done) = OrderedWriter::resume(&out, 1, row_of).unwrap();
        assert_eq!(
            done.iter().map(|p| p.row).collect::<Vec<_>>(),
            vec![10, 11, 12]
        );
        assert_eq!(w.next_position(), 3);
        w.put(3, finished(13, true)).unwrap();
        drop(w);
        let text = std::fs::read_to_string(&out).unwrap();
        assert_eq!(text.lines().count(), 3, "{text}");
        assert!(text.lines().last().unwrap().contains("q13"), "{text}");
        assert_eq!(std::fs::read_to_string(&prov).unwrap().lines().count(), 4);
        // Another run's file is refused.
        let other = |p: usize| [20, 21].get(p).copied();
        assert!(OrderedWriter::resume(&out, 1, other).is_err());
    }
}
