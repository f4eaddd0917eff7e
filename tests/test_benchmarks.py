"""Where the time goes: --benchmark's report, the peak memory on each platform, and the floor
script's sum of its timed parts."""
import json
import os
import subprocess
import sys
import types

import pytest

from lab import speed

from conftest import REPO, SMALL, run_cli


def test_benchmark_prints_where_the_time_goes_and_writes_nothing(tmp_path, data_dir, capsys,
                                                                 monkeypatch):
    monkeypatch.chdir(tmp_path)                         # where a run's default folder would go
    code = run_cli("--data-dir", data_dir, *SMALL, "--benchmark", "--epochs", "2")
    assert code == 0
    printed = capsys.readouterr().out
    for line in ("epoch   2", "median epoch", "per step (median of 12)", "matrix products alone",
                 "epoch / floor", "peak memory", "analysis after training: encode", "em", "surgery",
                 "iw_nll"):
        assert line in printed, printed
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("platform, maxrss, mb", [("linux", 125 * 1024, 125),
                                                  ("darwin", 125 * 2 ** 20, 125)])
def test_peak_memory_is_reported_in_megabytes_on_each_platform(monkeypatch, platform, maxrss, mb):
    def getrusage(who):
        return types.SimpleNamespace(ru_maxrss=maxrss)
    fake = types.SimpleNamespace(RUSAGE_SELF=0, getrusage=getrusage)
    monkeypatch.setitem(sys.modules, "resource", fake)
    monkeypatch.setattr(sys, "platform", platform)
    assert speed.peak_memory_mb() == pytest.approx(mb)


def test_peak_memory_without_resource_is_none_or_windows_own_count(monkeypatch):
    monkeypatch.setitem(sys.modules, "resource", None)  # import resource fails, as on Windows
    monkeypatch.setattr(os, "name", "posix")
    assert speed.peak_memory_mb() is None


def test_the_floor_script_reports_the_sum_of_its_timed_parts_as_the_epoch():
    # benchmarks/floor.py is the lower bound the docs compare train.py and PyTorch with: its epoch
    # must be the step's three parts added, times the steps of an epoch (ceil(N / B)), and its
    # bound's floor positive.
    command = [sys.executable, os.path.join(REPO, "benchmarks", "floor.py"), "--n-train", "1000",
               "--batch-size", "128", "--iw-samples", "2", "--n-test", "5000", "--reps", "3"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout.splitlines()[-1])
    parts = result["step_ms"]
    assert all(parts[k] > 0 for k in ("products", "adam", "exp_log"))
    assert result["iw_nll_floor_s"] > 0
    epoch_s = sum(parts.values()) / 1e3 * 8                                # 8 steps
    assert result["epoch_s_median"] == pytest.approx(epoch_s, rel=1e-12)
