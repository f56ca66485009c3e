"""The train-step benchmark script runs end to end on the tiny config (it is what a GPU session runs first)."""
import os
import tarfile

import pytest
from script_loader import ROOT, load_script


def test_benchmark_times_counts_flops_and_archives_a_profile(tmp_path, capsys):
    from configs import tiny
    from insloc_jax import flops

    bench = load_script("benchmark")
    bench.main(["--config", os.path.join(ROOT, "configs", "tiny.py"), "--per_device_batch", "2", "--steps", "2",
                "--warmup", "1", "--profile", str(tmp_path)])
    out = capsys.readouterr().out
    row = [line for line in out.splitlines() if line.startswith("| cpu | fpn | 2 |")]
    assert len(row) == 1, out
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert float(cells[5]) > 0 and float(cells[6]) > 0  # step ms, samples/s
    # The lowered program's FLOPs agree with the analytic count (which tests/test_flops.py checks layer by
    # layer) to within 10% (0.93 here, 0.986 for R50-FPN): the analytic count is 4 x forward, while XLA counts
    # the real backward pass, which for one takes no gradient for the input images.
    config = tiny.get_config()
    analytic = flops.step_from_config(config, config.data.canvas_size).model
    assert float(cells[8]) * 1e9 == pytest.approx(analytic, rel=0.1)
    archive = tmp_path / "fpn_2_float32.tar.gz"
    with tarfile.open(archive) as tar:
        assert any(name.endswith(".xplane.pb") for name in tar.getnames())


@pytest.mark.parametrize("arch", ["fpn", "c4"])
def test_torch_benchmark_runs_the_reference_step_on_the_cpu(arch, capsys):
    import math

    bench = load_script("benchmark_torch")
    bench.main(["--device", "cpu", "--tiny", "--arch", arch, "--per_device_batch", "4", "--steps", "1",
                "--warmup", "1", "--mode", "eager", "--dtype", "float32"])
    out = capsys.readouterr().out
    summary = [line for line in out.splitlines() if line.startswith("--- torch eager")]
    assert len(summary) == 1, out
    assert math.isfinite(float(summary[0].rsplit("loss ", 1)[1]))
    row = [line for line in out.splitlines() if line.startswith(f"| cpu | eager | {arch} | 4 |")]
    cells = [c.strip() for c in row[0].strip("|").split("|")]
    assert float(cells[5]) > 0 and float(cells[6]) > 0  # step ms, samples/s
