//! The run's summary beside its output: `OUT.summary.json`, `OUT.summary.md` and the
//! completion-length histogram `OUT.lengths.png`: records kept and dropped by reason, input rows
//! skipped by reason, token totals, throughput per server, and the client's own CPU share.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::Serialize;

use super::dispatch::ServerStats;
use super::output::Provenance;
use super::source::Shape;
use super::{SgrError, SgrSettings};

/// Seconds of CPU this process has used (user + system).
pub fn cpu_seconds() -> f64 {
    // SAFETY: getrusage fills the struct it is given; a zeroed rusage is a valid value.
    let usage = unsafe {
        let mut u: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_SELF, &mut u);
        u
    };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

/// What the summary is made from.
pub struct Inputs<'a> {
    pub settings: &'a SgrSettings,
    pub shape: Shape,
    pub rows: usize,
    pub skipped: BTreeMap<&'static str, usize>,
    pub provenance: &'a [Provenance],
    pub servers: Vec<ServerStats>,
    pub wall_s: f64,
    pub client_cpu_s: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub model: String,
    pub data: String,
    pub shape: Shape,
    pub rows: usize,
    /// Input rows that gave no prompt (or a too long one), by reason.
    pub skipped_rows: BTreeMap<String, usize>,
    /// Records by status: `kept`, `dropped_length`, `dropped_empty`.
    pub records: BTreeMap<String, usize>,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    /// Completion lengths of kept records, bucketed by powers of two (`"<=N"`).
    pub completion_lengths: BTreeMap<String, usize>,
    /// This run's share per server (a resumed run counts only what it generated).
    pub servers: Vec<ServerStats>,
    pub wall_s: f64,
    pub client_cpu_s: f64,
    /// Client CPU time over wall time.
    pub client_cpu_share: f64,
}

fn bucket(n: usize) -> usize {
    n.max(1).next_power_of_two()
}

impl Summary {
    pub fn new(i: Inputs<'_>) -> Self {
        let mut records = BTreeMap::new();
        let mut lengths: BTreeMap<usize, usize> = BTreeMap::new();
        let (mut prompt_tokens, mut completion_tokens) = (0u64, 0u64);
        for p in i.provenance {
            *records.entry(p.status.clone()).or_default() += 1;
            completion_tokens += p.completion_tokens as u64;
            if p.sample == 0 {
                prompt_tokens += p.prompt_tokens as u64;
            }
            if p.status == "kept" {
                *lengths.entry(bucket(p.completion_tokens)).or_default() += 1;
            }
        }
        Self {
            model: i.settings.model.clone(),
            data: i.settings.data.clone(),
            shape: i.shape,
            rows: i.rows,
            skipped_rows: i.skipped.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            records,
            prompt_tokens,
            completion_tokens,
            completion_lengths: lengths
                .into_iter()
                .map(|(b, n)| (format!("<={b:05}"), n))
                .collect(),
            servers: i.servers,
            wall_s: i.wall_s,
            client_cpu_s: i.client_cpu_s,
            client_cpu_share: i.client_cpu_s / i.wall_s.max(1e-9),
        }
    }

    fn markdown(&self) -> String {
        let mut s = format!(
            "# SGR: {} on {}\n\n{} input rows ({:?} shape). Wall {:.1} s; the client used {:.2} s of CPU ({:.2} % of wall).\n\n| records | count |\n|---|---|\n",
            self.model, self.data, self.rows, self.shape, self.wall_s, self.client_cpu_s,
            100.0 * self.client_cpu_share
        );
        for (k, v) in &self.records {
            s += &format!("| {k} | {v} |\n");
        }
        s += "\n| skipped input rows | count |\n|---|---|\n";
        for (k, v) in &self.skipped_rows {
            s += &format!("| {k} | {v} |\n");
        }
        s += &format!(
            "\nPrompt tokens {}, completion tokens {}.\n\n| completion length (kept) | records |\n|---|---|\n",
            self.prompt_tokens, self.completion_tokens
        );
        for (k, v) in &self.completion_lengths {
            s += &format!("| {k} | {v} |\n");
        }
        s += "\n| server | requests | completion tokens | tok/s over the run | failures |\n|---|---|---|---|---|\n";
        for v in &self.servers {
            s += &format!(
                "| {} | {} | {} | {:.1} | {} |\n",
                v.url,
                v.requests,
                v.completion_tokens,
                v.completion_tokens as f64 / self.wall_s.max(1e-9),
                v.failures
            );
        }
        s
    }

    /// Writes the JSON, Markdown and histogram files beside `out`.
    pub fn write(&self, out: &Path) -> Result<(), SgrError> {
        let path = |suffix: &str| -> PathBuf {
            let mut name = out.file_name().unwrap_or_default().to_os_string();
            name.push(suffix);
            out.with_file_name(name)
        };
        let json = path(".summary.json");
        let text = serde_json::to_string_pretty(self).map_err(|e| SgrError::io(&json, e))?;
        std::fs::write(&json, text).map_err(|e| SgrError::io(&json, e))?;
        let md = path(".summary.md");
        std::fs::write(&md, self.markdown()).map_err(|e| SgrError::io(&md, e))?;
        let bars: Vec<(String, usize)> = self
            .completion_lengths
            .iter()
            .map(|(k, v)| {
                (
                    k.trim_start_matches("<=")
                        .trim_start_matches('0')
                        .to_string(),
                    *v,
                )
            })
            .collect();
        let png = path(".lengths.png");
        let title = format!("SGR completion lengths (kept), {}", self.model);
        crate::plot::unless_no_font(
            crate::plot::histogram(&png, &title, "tokens (up to)", &bars),
            &png,
        )?;
        Ok(())
    }
}
