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


def bf16_probe(device, shape=(1, 1, 32, 64)):
    """fp32 and bf16 seconds of one DnCNN forward on a small input: the measurement behind a
    bf16 row skipped because emulated bf16 is several to hundreds of times slower than fp32."""
    import models
    generator = models.build_generator("dncnn").to(device).eval()
    x = torch.rand(*shape, device=device)
    seconds = {}
    for name, enabled in (("fp32", False), ("bf16", True)):
        def forward():
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled):
                generator(x)
        seconds[name] = timeit(forward, 1, device=device.type)
    seconds["slowdown"] = seconds["bf16"] / seconds["fp32"]
    print(f"bf16 is emulated on this {device.type}: DnCNN forward on {shape[-2]} x {shape[-1]}: "
          f"fp32 {seconds['fp32']:.3f} s, bf16 {seconds['bf16']:.3f} s ({seconds['slowdown']:.0f}x slower); "
          "full-size bf16 rows skipped (--force_bf16 runs them)")
    return seconds


def save(name, payload, gather=()):
    """bench/results/<name>.json. gather: keys of payload holding {entry: result} that collect entries over
    calls (runs, starts): an entry scored again replaces its own, the file's others stay, as do top-level keys
    this payload lacks."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    if gather and path.exists():
        earlier = json.loads(path.read_text())
        payload = {**earlier, **payload, **{key: {**earlier.get(key, {}), **payload[key]} for key in gather}}
    path.write_text(json.dumps(payload, indent=2) + "\n")
    print(f"results: {path}")
    return path


def test_samples(dataset, size=256, quick=False, split="test"):
    """(dataset, the test split's samples): duke28 from ../shared/data (the synthetic set when that
    is absent, said once), or the built-in synthetic set at size x size; --quick: the first two.
    split "val": instead train.py's validation subjects (duke28: 9-10, with their neighbours; synthetic: 8
    phantoms of its validation seed, with their neighbours)."""
    import datasets
    data = SHARED_DATA / "duke_bioptigen"
    if dataset == "duke28" and not data.is_dir():
        print(f"{data} not found: running on the synthetic set instead")
        dataset = "synthetic"
    root = data if dataset == "duke28" else None
    if split == "val":  # synthetic: 8 phantoms of train.py's validation seed, not 2, as the test set has 8
        samples = datasets.load_unpaired(dataset, root, "train", n_val=8 if dataset == "synthetic" else 2,
                                         synthetic_size=size)[2]
    else:
        samples = datasets.load_pairs(dataset, root, "test", synthetic_size=size)
    return dataset, samples[:2] if quick else samples
