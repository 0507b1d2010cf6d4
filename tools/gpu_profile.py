"""Where a GPU's time goes in ConViT-Ti inference, beside the same-size baseline's.

    python tools/gpu_profile.py                  # batch 128, 224x224, fp32 then bf16 autocast
    python tools/gpu_profile.py --batch-size 1024

For each precision and model: the wall-clock time of a batch (10 timed after 3 warm-up), the time
the GPU spent in kernels (torch.profiler over 5 more), and how many kernels a batch launches.
When the kernel time is well under the wall time, the GPU waits on the host (Python and
torch's dispatch, once per kernel), and a model that launches more kernels is slower for that
alone. Then torch.profiler's table of the operations that took the most kernel time.
Each batch is bench.py's inference job, so fp32 is plain fp32 there too (TF32 left off, torch's
default). docs/speed.md holds what it printed on an H200.
"""

import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import bench  # noqa: E402
import cli  # noqa: E402

WARMUP, TIMED, PROFILED = 3, 10, 5


def profile_model(model: torch.nn.Module, images: torch.Tensor, dtype: torch.dtype | None):
    batch = bench.inference_job(model, images, dtype)
    for _ in range(WARMUP):
        batch()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(TIMED):
        batch()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / TIMED * 1e3
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as profiler:
        for _ in range(PROFILED):
            batch()
        torch.cuda.synchronize()
    events = profiler.key_averages()
    kernels = [event for event in events if event.device_type == torch.autograd.DeviceType.CUDA]
    kernel_ms = sum(event.self_device_time_total for event in kernels) / PROFILED / 1e3
    launches = sum(event.count for event in kernels) / PROFILED
    return wall_ms, kernel_ms, launches, events


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python tools/gpu_profile.py", description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (default 128, Table 1's)")
    args = parser.parse_args(argv)
    cli.check_range("batch_size", args.batch_size, "[1, inf)")
    if not torch.cuda.is_available():
        print("no CUDA GPU: this profiles GPU kernels (bench.py --profile profiles the CPU)")
        return 0
    models = {name: model.cuda() for name, model in bench.comparison_models(224).items()
              if name != "convit explicit"}
    images = torch.randn(args.batch_size, 3, 224, 224, device="cuda")
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, batch {args.batch_size}, 224x224")
    for precision, dtype in (("fp32", None), ("bf16 autocast", torch.bfloat16)):
        for name, model in models.items():
            wall_ms, kernel_ms, launches, events = profile_model(model, images, dtype)
            print(f"\n=== {precision}, {name}: {wall_ms:.2f} ms a batch on the clock, {kernel_ms:.2f} ms of it in "
                  f"GPU kernels ({kernel_ms / wall_ms:.0%}), {launches:.0f} kernels a batch")
            print(events.table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
    return 0


if __name__ == "__main__":
    sys.exit(cli.run_command(main))
