//! With the `cuda` feature, compiles the engine's kernels (each `.cu` beside the Rust that launches
//! it: engine/ops/fused.cu, engine/ops/gemm.cu, engine/attention/attention.cu and decode.cu (with
//! common.cuh and decode_mma.cuh), engine/sample/sampling.cu, engine/adapters/lora.cu (with
//! common.cuh)) to PTX with nvcc (`$NVCC`, `$CUDA_HOME/bin/nvcc` or
//! `nvcc` on PATH) for `compute_$CUDA_COMPUTE_CAP` (default 80, JIT-compiled by the driver for
//! newer GPUs). Without the feature it does nothing.

use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if std::env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=NVCC");
    println!("cargo:rerun-if-env-changed=CUDA_COMPUTE_CAP");
    let nvcc = std::env::var("NVCC").unwrap_or_else(|_| match std::env::var("CUDA_HOME") {
        Ok(home) => format!("{home}/bin/nvcc"),
        Err(_) => "nvcc".into(),
    });
    let cap = std::env::var("CUDA_COMPUTE_CAP").unwrap_or_else(|_| "80".into());
    let out_dir = PathBuf::from(std::env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    for (name, src) in [
        ("fused", "src/engine/ops/fused.cu"),
        ("gemm", "src/engine/ops/gemm.cu"),
        ("attention", "src/engine/attention/attention.cu"),
        ("decode", "src/engine/attention/decode.cu"),
        ("sampling", "src/engine/sample/sampling.cu"),
        ("lora", "src/engine/adapters/lora.cu"),
    ] {
        println!("cargo:rerun-if-changed={src}");
        println!("cargo:rerun-if-changed=src/engine/attention/common.cuh");
        println!("cargo:rerun-if-changed=src/engine/attention/decode_mma.cuh");
        let out = out_dir.join(format!("{name}.ptx"));
        let status = Command::new(&nvcc)
            .args(["--ptx", "-O3", &format!("-arch=compute_{cap}"), src, "-o"])
            .arg(&out)
            .status()
            .unwrap_or_else(|e| panic!("cannot run {nvcc} for the cuda feature: {e}"));
        assert!(status.success(), "{nvcc} failed on {src}");
    }
}
