"""Shared bits of the benchmarks: machine description, timing, results files."""
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
RESULTS = ROOT / "bench" / "results"
SHARED_DATA = ROOT.parent / "shared" / "data"


def machine():
    """CPU model, cores, torch version and device, printed by every benchmark."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"}
    print("machine: " + ", ".join(f"{k} {v}" for k, v in info.items()))
    return info


def timeit(fn, repeats, warmup=1, device="cpu"):
    """Median seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if device != "cpu":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device != "cpu":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    times.sort()
    return times[len(times) // 2]


def matmul_gflops(device="cpu", size=1024, repeats=5):
    """The machine's fp32 matmul rate, the yardstick for the convolutions' rate."""
    a, b = torch.rand(size, size, device=device), torch.rand(size, size, device=device)
    seconds = timeit(lambda: a @ b, repeats, device=str(device))
    return 2 * size ** 3 / seconds / 1e9


def save(name, payload):
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results: {path}")
    return path
