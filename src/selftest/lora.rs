//! LoRA adapters on the device against the CPU engine:
//! - the slot-table kernels of one projection group (`adapters/cuda.rs`, f32 rows; `mma.rs`,
//!   bf16 rows on tensor cores) against the candle path on the CPU over the same values, for
//!   steps of 1 to 200 rows mixing two adapters of different ranks and plain rows (several
//!   tiles per adapter, one and two splits of `in`): within 1e-4 of the delta's size;
//! - a tiny Llama with a rank-16 adapter on all seven projections (every other request, every
//!   request with a long prompt, every request of 20): CUDA bf16 and f32 vs CPU f32;
//! - two adapters mixed with plain requests in decode steps replayed from CUDA graphs against
//!   the same steps launched eagerly.

use std::sync::Arc;

use candle_core::{DType, Device};

use super::{
    compare, pseudo_prompts, push, run, run_with, CacheKind, Check, SelftestError, GREEDY,
};
use crate::checkpoint::random_init::{init_random_adapter, AdapterInit};
use crate::checkpoint::ModelDir;
use crate::engine::adapters::peft::PROJECTION_NAMES;
use crate::engine::adapters::LoraAdapter;
#[cfg(feature = "cuda")]
use crate::engine::adapters::{Group, StepLora};
use crate::engine::model::DecoderModel;
#[cfg(feature = "cuda")]
use crate::engine::ops::gemm::ExactRows;

pub(super) fn adapter_checks(
    root: &std::path::Path,
    cuda: &Device,
    checks: &mut Vec<Check>,
    report: &mut impl FnMut(&Check),
) -> Result<(), SelftestError> {
    let arch = "LlamaForCausalLM";
    let dir = ModelDir::open(&root.join(arch))?;
    // alpha = r: scale 1, so the bf16 B the device holds is the file's exactly.
    let write = |name: &str, rank: usize, targets: &[&str]| -> Result<_, SelftestError> {
        let path = root.join(name);
        if !path.exists() {
            let init = AdapterInit {
                rank,
                alpha: rank as f64,
                targets,
                std: 0.05,
                dtype: DType::BF16,
                seed: rank as u64,
            };
            init_random_adapter(&dir.config, &init, &path)?;
        }
        Ok(path)
    };
    let adapter_dir = write("lora-r16", 16, &PROJECTION_NAMES)?;
    let second_dir = write("lora-r8", 8, &["q_proj", "v_proj", "down_proj"])?;
    let adapter = |path: &std::path::Path, device: &Device, dtype: DType| {
        LoraAdapter::load(path, &dir.config, device, dtype, 64)
            .map(Arc::new)
            .map_err(|e| SelftestError::Usage(format!("adapter: {e}")))
    };
    let load = |device: &Device, dtype: DType| -> Result<_, SelftestError> {
        let model = Arc::new(DecoderModel::load(&dir, device, dtype)?);
        Ok((model, vec![adapter(&adapter_dir, device, dtype)?]))
    };
    let (cpu_model, cpu_lora) = load(&Device::Cpu, DType::F32)?;
    // Both adapters on the device in bf16, for the kernel check and the graph check.
    #[cfg(feature = "cuda")]
    let both = [
        adapter(&adapter_dir, cuda, DType::BF16)?,
        adapter(&second_dir, cuda, DType::BF16)?,
    ];
    #[cfg(feature = "cuda")]
    {
        let cpu_both = [
            cpu_lora[0].clone(),
            adapter(&second_dir, &Device::Cpu, DType::F32)?,
        ];
        push(checks, report, kernel_check(&cpu_both, &both, cuda)?);
    }
    // Every other request of a short batch: the device's slot-table kernels on mixed rows.
    // Every request, with an 1100-token prompt: its prefill step runs the adapter as GEMMs.
    // Every request of 20: bf16 decode steps of 20 rows replay graphs running the slot table on
    // tensor cores (f32 ones run eagerly, as GEMMs).
    let every_other: fn(usize) -> Option<usize> = |i| (i % 2 == 0).then_some(0);
    let every: fn(usize) -> Option<usize> = |_| Some(0);
    let cases = [
        (
            "every other request",
            pseudo_prompts(512, &[7, 40, 90, 300]),
            every_other,
        ),
        (
            "every request, 1100-token prompt",
            pseudo_prompts(512, &[1100, 30]),
            every,
        ),
        ("every request of 20", pseudo_prompts(512, &[9; 20]), every),
    ];
    for (what, prompts, on) in cases {
        let want = run_with(
            &cpu_model,
            CacheKind::Contiguous,
            &prompts,
            24,
            4096,
            Some((cpu_lora.as_slice(), on)),
            GREEDY,
        )?;
        let plain = run(&cpu_model, CacheKind::Contiguous, &prompts, 24, 4096)?;
        let moved = compare(&want, &plain).prompt;
        for (dtype, limit) in [(DType::BF16, 2e-2f32), (DType::F32, 1e-3)] {
            let (m, lora) = load(cuda, dtype)?;
            let lora = Some((lora.as_slice(), on));
            let got = run_with(&m, CacheKind::Paged, &prompts, 24, 4096, lora, GREEDY)?;
            let d = compare(&got, &want);
            let (held, tokens_ok) = match dtype {
                DType::BF16 => (d.prompt, true),
                _ => (d.max(), d.diverge.iter().all(Option::is_none)),
            };
            push(
                checks,
                report,
                Check {
                    name: format!(
                        "tiny {arch} + LoRA r16 on {what}: CUDA {dtype:?} vs CPU f32 (within {limit:.0e}; the adapter moves prompt logprobs by {moved:.2e})"
                    ),
                    passed: held <= limit && tokens_ok && moved > 10.0 * limit,
                    informational: false,
                    detail: d.describe(24),
                },
            );
        }
    }
    // Two adapters of different ranks and targets and none, mixed in decode steps that replay
    // graphs (their slot table in a fixed buffer) against the same steps launched eagerly.
    #[cfg(feature = "cuda")]
    {
        let m = Arc::new(DecoderModel::load(&dir, cuda, DType::BF16)?);
        let mixed: fn(usize) -> Option<usize> = |i| [Some(0), Some(1), None][i % 3];
        let prompts = pseudo_prompts(512, &[7, 40, 90, 300, 12, 5]);
        let name = format!("tiny {arch} + LoRA r16 and r8 mixed");
        let on = Some((both.as_slice(), mixed));
        push(
            checks,
            report,
            super::graphs::graph_check(&m, &prompts, 40, on, &name)?,
        );
    }
    #[cfg(not(feature = "cuda"))]
    let _ = second_dir;
    Ok(())
}

/// The rows' adapters of the kernel check: two adapters and none, in turns.
#[cfg(feature = "cuda")]
fn rows_of(adapters: &[Arc<LoraAdapter>], t: usize) -> Vec<Option<Arc<LoraAdapter>>> {
    (0..t)
        .map(|i| [Some(0), Some(1), None][i % 3].map(|k| adapters[k].clone()))
        .collect()
}

/// One group's slot-table delta on the device (bf16 and f32 rows) against the candle path on
/// the CPU, relative to the largest delta.
#[cfg(feature = "cuda")]
fn kernel_check(
    cpu: &[Arc<LoraAdapter>],
    cuda: &[Arc<LoraAdapter>],
    device: &Device,
) -> Result<Check, SelftestError> {
    kernel_diffs(cpu, cuda, device).map_err(|e| SelftestError::Engine(e.into()))
}

#[cfg(feature = "cuda")]
fn kernel_diffs(
    cpu: &[Arc<LoraAdapter>],
    cuda: &[Arc<LoraAdapter>],
    device: &Device,
) -> candle_core::Result<Check> {
    let mut worst = [0f32; 2];
    let layer = 1;
    for t in [1, 9, 70, 200] {
        for group in Group::ALL {
            let Some(delta) = cpu[0].layer(layer).and_then(|l| group.of(l)) else {
                continue;
            };
            let (inp, out) = delta.dims()?;
            let seed = (t * 10 + group as usize) as u64;
            let x = super::graphs::values((t, inp), seed)?;
            let y = super::graphs::values((t, out), seed + 1)?.to_dtype(DType::F32)?;
            let x32 = x.to_dtype(DType::F32)?;
            let all = ExactRows::all(t);
            let want = StepLora::new(&rows_of(cpu, t), &Device::Cpu)?.add(
                y.clone(),
                &x32,
                (layer, group),
                &all,
            )?;
            let moved = (&want - &y)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            let lora = StepLora::new(&rows_of(cuda, t), device)?;
            for (k, xs) in [x, x32].iter().enumerate() {
                let (y, xs) = (y.to_device(device)?, xs.to_device(device)?);
                let got = lora.add(y, &xs, (layer, group), &all)?;
                let d = (got.to_device(&Device::Cpu)? - &want)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?;
                worst[k] = worst[k].max(d.to_scalar::<f32>()? / moved.max(1e-30));
            }
        }
    }
    Ok(Check {
        name: "LoRA slot-table kernels (bf16 rows on tensor cores, f32 rows) vs the CPU, two adapters and plain rows, 1 to 200 rows (within 1e-4 of the largest delta)".into(),
        passed: worst.iter().all(|w| *w <= 1e-4),
        informational: false,
        detail: format!("bf16 rows {:.2e}, f32 rows {:.2e}", worst[0], worst[1]),
    })
}
