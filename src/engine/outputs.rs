//! What a step returns for one packed forward: the LM head over only the rows whose logits are
//! needed (scored chunks' rows at full precision, each sequence's last row when it continues),
//! then prompt scores, device picks and draws, and logits rows for the host sampler, each in one
//! launch or transfer for the group.

use candle_core::Tensor;

use super::instrument::phase_times::phase;
use super::kv::ChunkRef;
use super::model::DecoderModel;
use super::ops::gemm::ExactRows;
use super::sample::scoring::{score_spans, ScoreSpan};
use super::{sample, RunSpec, StepItem, StepOutput};

/// The outputs of `members` (items of one group, packed in `chunks` order) from the group's
/// final-normed `hidden` rows.
pub(super) fn step_outputs(
    model: &DecoderModel,
    spec: &RunSpec,
    items: &[StepItem],
    members: &[usize],
    chunks: &[ChunkRef],
    hidden: &Tensor,
) -> candle_core::Result<Vec<StepOutput>> {
    let logits = group_logits(model, spec, items, members, chunks, hidden)?;
    let l = logits.as_ref();
    let layout = RowLayout::new(items, members);
    let mut greedy = on_rows(l, &layout.greedy_rows, "pick tokens", |rows| {
        sample::scoring::greedy_rows(rows, layout.greedy_k)
    })?;
    let mut drawn = on_rows(l, &layout.draw_rows, "draw tokens", |rows| {
        sample::scoring::draw_rows(rows, &layout.draws)
    })?;
    let mut full = on_rows(l, &layout.full_rows, "logits to host", |rows| {
        rows.to_vec2::<f32>()
    })?;
    let scored = |i: usize| items[i].score.as_ref().filter(|s| !s.targets.is_empty());
    let spans: Vec<ScoreSpan<'_>> = members
        .iter()
        .zip(&layout.score_at)
        .filter_map(|(&i, &at)| {
            scored(i).map(|s| ScoreSpan {
                at,
                targets: &s.targets,
                top_k: s.top_k,
            })
        })
        .collect();
    let mut scores = match l {
        Some(l) if !spans.is_empty() => {
            phase(l.device(), "score rows", || score_spans(l, &spans))?.into_iter()
        }
        _ => Vec::new().into_iter(),
    };
    let mut outs = Vec::with_capacity(members.len());
    for &i in members {
        let it = &items[i];
        let mut out = StepOutput {
            seq: it.seq,
            scores: Vec::new(),
            logits: None,
            greedy: None,
        };
        if scored(i).is_some() {
            out.scores = scores.next().unwrap_or_default();
        }
        if it.want_logits {
            match (it.greedy_top, it.draw) {
                (Some(k), _) => {
                    out.greedy = greedy.next().map(|mut g| {
                        g.top.truncate(k);
                        g
                    })
                }
                (None, Some(_)) => out.greedy = drawn.next(),
                (None, None) => out.logits = full.next(),
            }
        }
        outs.push(out);
    }
    Ok(outs)
}

/// Logits of only the rows whose logits are needed (scored chunks' rows, computed exactly, and
/// the last row of each item that wants logits), in member order; none when no row is.
fn group_logits(
    model: &DecoderModel,
    spec: &RunSpec,
    items: &[StepItem],
    members: &[usize],
    chunks: &[ChunkRef],
    hidden: &Tensor,
) -> candle_core::Result<Option<Tensor>> {
    let mut rows: Vec<u32> = Vec::new();
    let mut exact = Vec::new();
    for (c, &i) in chunks.iter().zip(members) {
        let it = &items[i];
        let first = rows.len();
        if let Some(s) = &it.score {
            rows.extend((0..s.targets.len()).map(|r| (c.offset + r) as u32));
        }
        if it.want_logits {
            rows.push((c.offset + c.len - 1) as u32);
        }
        if c.scored {
            exact.push(first..rows.len());
        }
    }
    if rows.is_empty() {
        return Ok(None);
    }
    let logits = model.logits(
        &select_rows(hidden, &rows)?,
        spec.overlay.as_deref(),
        &ExactRows::from_runs(exact),
    )?;
    Ok(Some(logits))
}

/// Where each member's rows sit in the group's logits: its scored rows from `score_at`, then
/// its last row, which is picked greedily on the device, drawn on the device, or sent to the
/// host whole.
struct RowLayout {
    score_at: Vec<usize>,
    greedy_rows: Vec<u32>,
    greedy_k: usize,
    draw_rows: Vec<u32>,
    draws: Vec<sample::sampler::DeviceDraw>,
    full_rows: Vec<u32>,
}

impl RowLayout {
    fn new(items: &[StepItem], members: &[usize]) -> Self {
        let mut layout = RowLayout {
            score_at: Vec::with_capacity(members.len()),
            greedy_rows: Vec::new(),
            greedy_k: 0,
            draw_rows: Vec::new(),
            draws: Vec::new(),
            full_rows: Vec::new(),
        };
        let mut next_row = 0;
        for &i in members {
            let it = &items[i];
            layout.score_at.push(next_row);
            next_row += it.score.as_ref().map_or(0, |s| s.targets.len());
            if it.want_logits {
                let row = next_row as u32;
                match (it.greedy_top, it.draw) {
                    (Some(k), _) => {
                        layout.greedy_rows.push(row);
                        layout.greedy_k = layout.greedy_k.max(k);
                    }
                    (None, Some(d)) => {
                        layout.draw_rows.push(row);
                        layout.draws.push(d);
                    }
                    (None, None) => layout.full_rows.push(row),
                }
                next_row += 1;
            }
        }
        layout
    }
}

/// `f` over the `rows` of `logits` (selected and run as the phase `name`), or nothing when there
/// are no such rows.
fn on_rows<T>(
    logits: Option<&Tensor>,
    rows: &[u32],
    name: &'static str,
    f: impl FnOnce(&Tensor) -> candle_core::Result<Vec<T>>,
) -> candle_core::Result<std::vec::IntoIter<T>> {
    match logits {
        Some(l) if !rows.is_empty() => {
            Ok(phase(l.device(), name, || f(&select_rows(l, rows)?))?.into_iter())
        }
        _ => Ok(Vec::new().into_iter()),
    }
}

/// Rows `rows` of `t` (`[n, ...]`): a view when they are consecutive (every row of a decode
/// step's hidden states or logits: no copy, where candle's `index_select` took 63 us for the
/// logits of 64 rows), else gathered by `index_select`.
fn select_rows(t: &Tensor, rows: &[u32]) -> candle_core::Result<Tensor> {
    let consecutive = rows.windows(2).all(|w| w[1] == w[0] + 1);
    match rows.first() {
        Some(&first) if consecutive => t.narrow(0, first as usize, rows.len()),
        _ => t.index_select(&Tensor::new(rows, t.device())?, 0),
    }
}
