"""Cost and time of labeling 1 million and 100 million recordings on a Ray cluster, on paper.

Measured inputs (from a `bench all` JSON): t_feat and t_infer per file on one core, windows per file, and,
from the two memory runs (so start-up cancels out), the driver's CPU seconds and the tree's peak memory per
additional file. Everything else is an assumption,
named below; the GPU throughput in particular is an estimate, not a measurement (no GPU was available).
"""

from __future__ import annotations

import math

# Assumptions (on-demand list prices, us-east-1, late 2024; change them to your own).
CPU_NODE = {"name": "c6a.8xlarge", "vcpus": 32, "usd_per_hour": 1.224}
GPU_NODE = {"name": "g5.xlarge (1x A10G)", "vcpus": 4, "usd_per_hour": 1.006}
GPU_WINDOWS_PER_S_ESTIMATE = 5000  # ESTIMATE: windows/s of this CNN-BiLSTM on one A10G at batch 512
S3_GET_USD_PER_1000 = 0.0004
S3_LIST_USD_PER_1000 = 0.005
S3_KEYS_PER_LIST = 1000
CPU_NODES = 10  # the cluster the wall times assume: this many CPU nodes for decoding ...
USABLE_FRACTION = 0.8  # ... of whose cores this share does useful decoding (Ray, the OS, imbalance)
COLLECTIONS = (1_000_000, 100_000_000)
DRIVER_ROLE = "ser"  # the `ser label` process: listing, Ray Data's scheduler, the commits


def _slope(results: dict, value) -> float:
    """Growth of `value(run)` per listed file between the small and the large memory runs (start-up cancels)."""
    small, large = (results["memory"][k] for k in sorted(results["memory"], key=int))
    return (value(large) - value(small)) / (large["files"] - small["files"])


def _per_file(results: dict) -> dict:
    """Measured per-file costs: decode and CPU-inference core-seconds, windows, driver CPU, memory growth."""
    ideal = results["ideal"]
    return {
        "decode_core_s": ideal["t_feat_s"],
        "cpu_infer_core_s": ideal["t_infer_s"],
        "windows": ideal["windows_per_file"],
        "driver_cpu_s": _slope(results, lambda run: run["usage"]["cpu_s_by_role"].get(DRIVER_ROLE, 0.0)),
        "memory_bytes": max(0.0, _slope(results, lambda run: run["usage"]["peak_rss_bytes"])),
    }


def project(results: dict, files: int) -> dict:
    """Core-hours, GPU-hours, dollars and wall time for `files` recordings like the benchmark's."""
    unit = _per_file(results)
    decode_core_h = files * unit["decode_core_s"] / 3600
    cpu_infer_core_h = files * unit["cpu_infer_core_s"] / 3600
    gpu_h = files * unit["windows"] / GPU_WINDOWS_PER_S_ESTIMATE / 3600
    core_usd = CPU_NODE["usd_per_hour"] / CPU_NODE["vcpus"]
    decode_rate = CPU_NODES * CPU_NODE["vcpus"] * USABLE_FRACTION / unit["decode_core_s"]  # files/s
    gpus = math.ceil(decode_rate * unit["windows"] / GPU_WINDOWS_PER_S_ESTIMATE)
    driver_rate = 1 / unit["driver_cpu_s"] if unit["driver_cpu_s"] > 0 else math.inf
    s3_usd = files * S3_GET_USD_PER_1000 / 1000 + files / S3_KEYS_PER_LIST * S3_LIST_USD_PER_1000 / 1000
    return {
        "files": files,
        "decode_core_hours": decode_core_h,
        "decode_usd": decode_core_h / USABLE_FRACTION * core_usd,
        "cpu_inference_core_hours": cpu_infer_core_h,
        "cpu_inference_usd": cpu_infer_core_h / USABLE_FRACTION * core_usd,
        "gpu_hours_estimate": gpu_h,
        "gpu_usd_estimate": gpu_h * GPU_NODE["usd_per_hour"],
        "s3_requests_usd": s3_usd,
        "cluster": f"{CPU_NODES} x {CPU_NODE['name']} + {gpus} x {GPU_NODE['name']}",
        "decode_files_per_s": decode_rate,
        "driver_files_per_s_limit": driver_rate,
        "wall_hours": files / min(decode_rate, driver_rate) / 3600,
        "memory_growth_gib": files * unit["memory_bytes"] / 2**30,
    }


def table(results: dict) -> str:
    """The projection for each collection size, one column each."""
    rows = [project(results, n) for n in COLLECTIONS]
    lines = [f"{'':<28}" + "".join(f"{r['files']:>18,}" for r in rows)]
    for key, value in rows[0].items():
        if isinstance(value, float):
            lines.append(f"{key:<28}" + "".join(f"{r[key]:>18,.2f}" for r in rows))
    lines.append(f"{'cluster (wall_hours)':<28}{rows[0]['cluster']}")
    return "\n".join(lines)
