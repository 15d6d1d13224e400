"""What cuBLAS and cuBLASLt reach on the decode GEMMs of the Llama-3.1-8B shape (torch.mm of bf16
rows by bf16 weights, bf16 and f32 output, 1 to 256 rows), to compare with the engine's GEMMs in
Nsight Compute: weights are rotated over enough copies (600 MB) that L2 holds none between
launches; 30 launches back to back between two events. Prints µs and TB/s of weights read.
Usage (GPU machine): python3 bench/gemm_probe.py"""
import torch

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
ROWS = [1, 64, 128, 256]
REPS = 30


def micros(fn):
    for i in range(3):
        fn(i)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(REPS):
        fn(i)
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / REPS


def main():
    torch.backends.cuda.matmul.allow_bf16_reduced_precision_reduction = False
    for lib in ["cublas", "cublaslt"]:
        torch.backends.cuda.preferred_blas_library(lib)
        for name, (n, k) in SHAPES.items():
            copies = max(2, int(600e6 // (n * k * 2)))
            ws = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
            for m in ROWS:
                x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
                row = []
                for label, out in [("bf16", None), ("f32", torch.float32)]:
                    kwargs = {} if out is None else {"out_dtype": out}
                    us = micros(lambda i: torch.mm(x, ws[i % copies].t(), **kwargs))
                    row.append(f"{label} {us:7.1f} us {n * k * 2 / us / 1e6:5.2f} TB/s")
                print(f"{lib:9s} {name:8s} M={m:4d}  " + " | ".join(row), flush=True)
            del ws


if __name__ == "__main__":
    main()
