//! How long a decode layer's operations other than attention take on the 8B shape
//! (informational), at 1 to 512 rows: RMSNorm of the f32 residual to bf16, the q|k|v,
//! o, gate|up and down projections (bf16 rows, f32 outputs; o and down accumulating into the
//! residual, as decode steps run them) and `act_mul`. Each is timed as decode_timing times the
//! attention kernels ([`best_micros`]), its weights rotated over [`COPIES`] copies (1.7 GB in
//! all) so that L2 holds none of them between launches; projections also report the TB/s of
//! weights read. The engine runs these inside decode graphs, where launch gaps are smaller; the
//! figures are each operation's own time, to say which one a change should take on.

use candle_core::{DType, Device, Tensor};

use super::decode_timing::{best_micros, timing_check, LAUNCHES};
use super::Check;
use crate::engine::model::config::Activation;
use crate::engine::ops::fused::{act_mul, rms_norm_to};
use crate::engine::ops::gemm::{linear_f32, linear_f32_accumulate};

const HIDDEN: usize = 4096;
const QKV: usize = 6144;
const INTERMEDIATE: usize = 14336;
const ROWS: [usize; 8] = [1, 8, 16, 32, 64, 128, 256, 512];
/// Copies of each weight the launches rotate over.
const COPIES: usize = 4;

/// `COPIES` bf16 weights `[out, in]` (constant values: the time does not depend on them).
fn weights(cuda: &Device, out: usize, inp: usize) -> candle_core::Result<Vec<Tensor>> {
    (0..COPIES)
        .map(|_| Tensor::full(0.01f32, (out, inp), cuda)?.to_dtype(DType::BF16))
        .collect()
}

/// The layer's weights: q|k|v, o, gate|up, down.
struct Layer {
    qkv: Vec<Tensor>,
    o: Vec<Tensor>,
    gate_up: Vec<Tensor>,
    down: Vec<Tensor>,
}

/// `name µs` for an operation, with `TB/s` of `bytes` when given.
fn figure(name: &str, us: f64, bytes: Option<usize>) -> String {
    match bytes {
        Some(b) => format!("{name} {us:.1} ({:.2} TB/s)", b as f64 / (us * 1e-6) / 1e12),
        None => format!("{name} {us:.1}"),
    }
}

/// One line: each operation's µs at `rows` rows.
fn timings(cuda: &Device, layer: &Layer, rows: usize) -> candle_core::Result<String> {
    let residual = Tensor::full(0.5f32, (rows, HIDDEN), cuda)?;
    let alpha = Tensor::full(1f32, HIDDEN, cuda)?;
    let normed = residual.to_dtype(DType::BF16)?;
    let gate_up = Tensor::full(0.5f32, (rows, 2 * INTERMEDIATE), cuda)?;
    let act = Tensor::full(0.5f32, (rows, INTERMEDIATE), cuda)?.to_dtype(DType::BF16)?;
    let bytes = |w: &[Tensor]| w[0].elem_count() * 2;
    let project = |w: &[Tensor]| {
        best_micros(cuda, |i| {
            linear_f32(&normed, &w[i % COPIES], None).map(|_| ())
        })
    };
    // Accumulating into a copy of the residual each launch would time the copy too: the same
    // tensor takes every launch's sum (values do not matter here).
    let accumulate = |x: &Tensor, w: &[Tensor]| {
        best_micros(cuda, |i| {
            linear_f32_accumulate(residual.clone(), x, &w[i % COPIES]).map(|_| ())
        })
    };
    let parts = [
        figure(
            "norm",
            best_micros(cuda, |_| {
                rms_norm_to(&residual, &alpha, 1e-5, DType::BF16).map(|_| ())
            })?,
            None,
        ),
        figure("q|k|v", project(&layer.qkv)?, Some(bytes(&layer.qkv))),
        figure("o+=", accumulate(&normed, &layer.o)?, Some(bytes(&layer.o))),
        figure(
            "gate|up",
            project(&layer.gate_up)?,
            Some(bytes(&layer.gate_up)),
        ),
        figure(
            "act_mul",
            best_micros(cuda, |_| {
                act_mul(&gate_up, Activation::Silu, DType::BF16).map(|_| ())
            })?,
            None,
        ),
        figure(
            "down+=",
            accumulate(&act, &layer.down)?,
            Some(bytes(&layer.down)),
        ),
    ];
    Ok(format!("{rows} rows: {} µs", parts.join(", ")))
}

/// The informational timing ([`timing_check`]).
pub(super) fn layer_timing_check(cuda: &Device) -> Check {
    let name = format!(
        "decode layer operations besides attention, 8B shape (best of 3 x {LAUNCHES} launches, \
         weights rotated over {COPIES} copies)"
    );
    let lines = (|| -> candle_core::Result<Vec<String>> {
        let layer = Layer {
            qkv: weights(cuda, QKV, HIDDEN)?,
            o: weights(cuda, HIDDEN, HIDDEN)?,
            gate_up: weights(cuda, 2 * INTERMEDIATE, HIDDEN)?,
            down: weights(cuda, HIDDEN, INTERMEDIATE)?,
        };
        ROWS.iter()
            .map(|&rows| timings(cuda, &layer, rows))
            .collect()
    })();
    timing_check(name, lines)
}
