"""Device copy bandwidth (bytes read + written per second) of a 4 GiB bf16 tensor copy: the
denominator of the decode floor (weight bytes / bandwidth)."""
import json
import sys

import torch

n = 2 << 30
src = torch.empty(n, dtype=torch.bfloat16, device="cuda")
dst = torch.empty_like(src)
for _ in range(3):
    dst.copy_(src)
torch.cuda.synchronize()
start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
start.record()
reps = 20
for _ in range(reps):
    dst.copy_(src)
end.record()
torch.cuda.synchronize()
seconds = start.elapsed_time(end) / 1e3
bw = 2 * src.numel() * src.element_size() * reps / seconds
print(f"copy bandwidth: {bw / 1e12:.2f} TB/s ({torch.cuda.get_device_name()})", flush=True)
json.dump({"copy_bytes_per_s": bw, "device": torch.cuda.get_device_name()}, open(sys.argv[1], "w"))
