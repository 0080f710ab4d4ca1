"""``spec-calibrate``: measure this GPU and write a hardware profile the simulator loads as ``hardware=<name>``.

    spec-calibrate --name h100-measured                # writes conf/hardware/h100-measured.yaml
    spec-calibrate --name mine --out /tmp/profiles --quick

Measured with CUDA events (medians of repeats): host-to-device copies of 64 KiB .. 256 MiB from pinned and pageable
memory, fitted to ``latency + bytes / bandwidth``; a pinned copy while a matmul loop keeps the GPU busy (the decode
situation; the simulator's link bandwidth when set); the target's expert FFN for 1 .. 4096 tokens (memory-bound at
1 token: effective memory bandwidth; compute-bound at 4096: effective fp16 throughput); one tiny kernel's launch.
"""

from __future__ import annotations

import argparse
import datetime as dt
import re
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from omegaconf import OmegaConf

from speculation.cache.engine import require_cuda
from speculation.config import CONF_DIR
from speculation.config.simulate import HardwareConfig, TargetConfig
from speculation.errors import UserError
from speculation.io import atomic_write_json, atomic_write_text

NAME = re.compile(r"^[a-z0-9][a-z0-9_-]*$")


def fit_link(sizes: list[int], seconds: list[float]) -> tuple[float, float]:
    """Least-squares ``seconds = latency + bytes / bandwidth``: (latency in µs, bandwidth in GB/s)."""
    slope, intercept = np.polyfit(np.asarray(sizes, dtype=float), np.asarray(seconds, dtype=float), 1)
    if slope <= 0:
        raise UserError(f"copy times do not grow with size ({seconds}); the measurement is noise, rerun it.")
    return max(intercept, 0.0) * 1e6, 1.0 / slope / 1e9


def write_profile(profile: HardwareConfig, directory: Path, source: str) -> Path:
    """``directory/<name>.yaml`` (atomically): every field, with where the numbers came from."""
    if not NAME.match(profile.name):
        raise UserError(f"--name {profile.name!r} must be lowercase letters, digits, '-' or '_' (a file name).")
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / f"{profile.name}.yaml"
    body = OmegaConf.to_yaml(OmegaConf.structured(profile))
    atomic_write_text(path, f"# {source}\n{body}")
    return path


def load_profile(path: Path) -> HardwareConfig:
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(HardwareConfig), OmegaConf.load(path)))


def _median_s(fn: Callable[[], object], repeats: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    return statistics.median(times)


def _copy(gpu: torch.Tensor, host: torch.Tensor, nbytes: int, pinned: bool) -> Callable[[], object]:
    return lambda: gpu[:nbytes].copy_(host[:nbytes], non_blocking=pinned)


def measure(name: str, target: TargetConfig, quick: bool = False) -> tuple[HardwareConfig, dict]:
    """Every measurement on the current GPU; the profile and the raw numbers."""
    device = require_cuda()
    repeats = 3 if quick else 10
    sizes = [2**k for k in range(16, 28 if quick else 30, 2)]  # 64 KiB .. 64 MiB (quick) or 256 MiB
    raw: dict = {"device": torch.cuda.get_device_name(device), "sizes": sizes}
    gpu_buffer = torch.empty(max(sizes), dtype=torch.uint8, device=device)
    for kind, pinned in (("pinned", True), ("pageable", False)):
        host = torch.empty(max(sizes), dtype=torch.uint8, pin_memory=pinned)
        raw[kind] = [_median_s(_copy(gpu_buffer, host, n, pinned), repeats) for n in sizes]
    latency_us, pinned_gbs = fit_link(sizes, raw["pinned"])
    _, pageable_gbs = fit_link(sizes, raw["pageable"])

    # a pinned copy on a side stream while the default stream multiplies matrices (the decode situation)
    host = torch.empty(max(sizes), dtype=torch.uint8, pin_memory=True)
    a = torch.randn(4096, 4096, device=device, dtype=torch.float16)
    side = torch.cuda.Stream()
    under_compute = []
    for _ in range(repeats):
        for _ in range(16):
            a @ a  # keeps the GPU busy for longer than the copy takes
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        with torch.cuda.stream(side):
            start.record(side)
            gpu_buffer.copy_(host, non_blocking=True)
            end.record(side)
        torch.cuda.synchronize()
        under_compute.append(start.elapsed_time(end) * 1e-3)
    raw["pinned_under_compute_s"] = statistics.median(under_compute)
    under_compute_gbs = max(sizes) / (raw["pinned_under_compute_s"] - latency_us * 1e-6) / 1e9

    d, f = target.d_model, target.d_ff
    weights = torch.randn(target.expert_matrices, d, f, device=device, dtype=torch.float16) * 0.02
    tokens = [1, 4, 16, 64, 256, 1024, 4096]

    def expert(n: int) -> Callable[[], object]:
        x = torch.randn(n, d, device=device, dtype=torch.float16)
        return lambda: torch.relu(x @ weights[0]) @ weights[1].T

    raw["expert_s"] = [_median_s(expert(n), repeats) for n in tokens]
    tiny = torch.zeros(1, device=device)
    launches = 200
    launch_us = _median_s(lambda: [tiny.add_(1) for _ in range(launches)], repeats) / launches * 1e6
    kernels = 3  # two matmuls and the activation
    memory_s = max(raw["expert_s"][0] - kernels * launch_us * 1e-6, 1e-9)
    hbm_gbs = 2 * d * f * 2 / memory_s / 1e9
    tflops = 2 * tokens[-1] * 2 * d * f / raw["expert_s"][-1] / 1e12
    props = torch.cuda.get_device_properties(device)
    profile = HardwareConfig(
        name=name,
        memory_gb=round(props.total_memory / 1e9, 1),
        hbm_gbs=round(hbm_gbs, 1),
        fp16_tflops=round(tflops, 1),
        h2d_pinned_gbs=round(pinned_gbs, 2),
        h2d_pageable_gbs=round(pageable_gbs, 2),
        h2d_under_compute_gbs=round(under_compute_gbs, 2),
        copy_latency_us=round(latency_us, 2),
        launch_us=round(launch_us, 2),
        pinned=True,
    )
    raw["tokens"] = tokens
    return profile, raw


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="profile name: hardware=<name> loads it")
    parser.add_argument("--out", type=Path, default=Path(CONF_DIR) / "hardware", help="directory of the YAML")
    parser.add_argument("--target", default="switch_base_8", help="conf/target/<name>.yaml: expert size to time")
    parser.add_argument("--quick", action="store_true", help="fewer sizes and repeats (a smoke check)")
    args = parser.parse_args(argv)
    if not NAME.match(args.name):
        parser.error(f"--name {args.name!r} must be lowercase letters, digits, '-' or '_' (a file name).")
    target_file = Path(CONF_DIR) / "target" / f"{args.target}.yaml"
    if not target_file.is_file():
        known = sorted(p.stem for p in target_file.parent.glob("*.yaml"))
        parser.error(f"--target {args.target!r} is not in conf/target/; choose from {known}.")
    target = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(TargetConfig), OmegaConf.load(target_file)))
    try:
        profile, raw = measure(args.name, target, args.quick)
    except RuntimeError as error:  # no CUDA: one line, not a traceback
        parser.exit(1, f"spec-calibrate: {error}\n")
    stamp = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    path = write_profile(profile, args.out, f"measured by spec-calibrate on {raw['device']}, {stamp}")
    atomic_write_json(args.out / f"{args.name}.raw.json", raw)  # the measurements behind it
    print(f"wrote {path}: {profile}")


if __name__ == "__main__":
    main()
