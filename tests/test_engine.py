"""The real prefetch engine's CPU-side parts: profile fitting and I/O, argument errors, the shared schedule, and
one clear error without CUDA. The engine run itself is a ``gpu`` test."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import CONF_DIR

from speculation.cache import calibrate
from speculation.cache.engine import PrefetchEngine, require_cuda
from speculation.cache.kernel import PolicyRun
from speculation.cache.plans import ReplayTrace, oracle_plan
from speculation.cache.timing import TimingModel
from speculation.cache.validate import comparison_row, simulate_recorded
from speculation.config.simulate import HardwareConfig, TargetConfig

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error a machine without CUDA gives")


def test_link_fit_recovers_latency_and_bandwidth():
    sizes = [2**k for k in range(16, 30, 2)]
    seconds = [5e-6 + n / 20e9 for n in sizes]
    latency_us, gbs = calibrate.fit_link(sizes, seconds)
    assert latency_us == pytest.approx(5.0, rel=1e-6) and gbs == pytest.approx(20.0, rel=1e-9)
    with pytest.raises(ValueError, match="copy times do not grow with size"):
        calibrate.fit_link(sizes, seconds[::-1])


@pytest.mark.parametrize("path", sorted((CONF_DIR / "hardware").glob("*.yaml")), ids=lambda p: p.stem)
def test_every_shipped_profile_loads_and_round_trips(path: Path, tmp_path):
    profile = calibrate.load_profile(path)
    assert profile.name == path.stem or profile.name.replace("-", "_") == path.stem
    written = calibrate.write_profile(profile, tmp_path, "round trip")
    assert calibrate.load_profile(written) == profile and written.read_text().startswith("# round trip")


def test_a_measured_profile_changes_the_link_model():
    measured = HardwareConfig(name="mine", h2d_pinned_gbs=24.0, h2d_under_compute_gbs=12.0)

    plain = TimingModel.from_profiles(HardwareConfig(), TargetConfig())
    slower = TimingModel.from_profiles(measured, TargetConfig())
    assert slower.copy_s - 6e-6 == pytest.approx(2 * (plain.copy_s - 6e-6))


def test_bad_arguments_are_one_clear_error(capsys):
    with pytest.raises(ValueError, match=r"--name 'Bad Name' must be lowercase"):
        calibrate.write_profile(HardwareConfig(name="Bad Name"), Path("/nonexistent"), "")
    with pytest.raises(SystemExit):
        calibrate.main(["--name", "Bad Name"])
    assert "must be lowercase letters" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        calibrate.main(["--name", "ok", "--target", "gpt5"])
    assert "--target 'gpt5' is not in conf/target/; choose from" in capsys.readouterr().err


@no_cuda
def test_without_cuda_the_engine_and_calibration_say_so_once(capsys):
    message = r"the prefetch engine needs a CUDA GPU .* use the simulator \(spec-evaluate\)"
    with pytest.raises(RuntimeError, match=message):
        require_cuda()
    with pytest.raises(RuntimeError, match=message):
        PrefetchEngine(TargetConfig(), 2, 2, 2)
    with pytest.raises(SystemExit):
        calibrate.main(["--name", "ok", "--quick"])
    assert "spec-calibrate: the prefetch engine needs a CUDA GPU" in capsys.readouterr().err


def recorded_schedule(eviction: str = "lru") -> tuple:
    """What spec-validate-engine hands the engine: the simulator's recorded schedule of an oracle run."""
    rng = np.random.default_rng(0)
    experts = rng.integers(0, 4, size=(50, 3, 1)).astype(np.int32)
    run = PolicyRun("oracle", "", eviction, 1, 1, oracle_plan(experts, 1), 0.0, clairvoyant=True)
    timing = TimingModel(copy_s=4e-4, expert_s=2e-5, non_expert_s=1e-4, head_s=5e-5, expert_bytes=1)
    return simulate_recorded(ReplayTrace(experts, 4, {}), run, 6, timing)


def test_the_schedule_groups_copies_by_layer_and_the_table_compares_like_with_like():
    token_s, counters, schedule = recorded_schedule()
    grouped = schedule.copies_at()
    assert sum(len(v) for v in grouped.values()) == len(schedule.copies)
    first = schedule.copies[0]
    assert grouped[int(first[0])][0] == (int(first[2]), int(first[3]))
    run = PolicyRun("oracle", "", "lru", 1, 1, oracle_plan(np.zeros((1, 3, 1), dtype=np.int32), 1), 0.0)
    engine_s = token_s[8:] * 1.1  # an engine 10 % slower on the tokens after its warm-up
    row = comparison_row(run, 0.5, token_s, engine_s, counters, schedule)
    assert row["tokens"] == 42 and row["engine_over_sim"] == pytest.approx(1.1)
    assert row["counts_identical"] and row["engine_demand_copies"] == counters.misses


@pytest.mark.gpu
def test_engine_executes_a_schedule_on_the_gpu():
    token_s, _, schedule = recorded_schedule()
    target = TargetConfig(name="tiny", d_model=64, d_ff=128, attention_params=4 * 64 * 64, dense_d_ff=128,
                          vocab_size=256)  # fmt: skip
    engine = PrefetchEngine(target, num_layers=3, num_experts=4, capacity=6)
    seconds = engine.run(schedule, warmup_tokens=4)
    assert len(seconds) == len(token_s) - 4 and (seconds > 0).all()
