"""benchmarks.gpu and scripts/gpu_check.sh where there is no GPU: the rows are listed, skipped with a
reason, or run on the CPU as a smoke test; the report goes into its section of a markdown file."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks import gpu

ROOT = Path(__file__).resolve().parents[1]


def run_module(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    return subprocess.run([sys.executable, "-m", "benchmarks.gpu", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)


def test_the_rows_are_the_odenet_block_at_two_batches_and_the_mlp_against_both_torchdiffeq_modes():
    ids = [row.id for row in gpu.rows()]
    assert len(ids) == 24 and len(set(ids)) == 24
    for workload, solvers in (("odenet-b128", ("rk4/16", "dopri5/0.001")), ("odenet-b512", ("rk4/16", "dopri5/0.001")),
                              ("mlp-b256", ("rk4/50", "dopri5/1e-05"))):
        for solver in solvers:
            for library in gpu.LIBRARIES:
                assert f"{workload}/{solver}/{library}" in ids


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here: the rows would run")
def test_without_a_gpu_the_rows_are_reported_as_skipped(tmp_path):
    proc = run_module("--quick", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert doc["rows"] == [] and "no GPU" in doc["skipped"]
    markdown = (tmp_path / "gpu.md").read_text()
    assert "GPU rows skipped" in markdown and "Nothing here was measured on a GPU" in markdown


def test_the_rows_run_on_the_cpu_as_a_smoke_test(tmp_path):
    proc = run_module("--quick", "--device", "cpu", "--rows", "mlp-b256/rk4/*", "--out", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    doc = json.loads((tmp_path / "gpu.json").read_text())
    assert [entry["library"] for entry in doc["rows"]] == list(gpu.LIBRARIES)
    for entry in doc["rows"]:
        assert "error" not in entry["result"], entry["result"]
        assert entry["result"]["time_s"] > 0
    markdown = (tmp_path / "gpu.md").read_text()
    assert "Measured on the CPU (a smoke test" in markdown and "| pnode:graphs |" in markdown


def test_the_report_replaces_its_own_section_and_keeps_the_rest(tmp_path):
    page = tmp_path / "BENCHMARKS.md"
    page.write_text("# Benchmarks\n\nbefore\n")
    doc = {"date": "d1", "machine": {"device": "cpu"}, "skipped": "no GPU here", "rows": []}
    gpu.render_into(gpu.render(doc), str(page))
    gpu.render_into(gpu.render({**doc, "date": "d2"}), str(page))
    text = page.read_text()
    assert text.startswith("# Benchmarks\n\nbefore\n")
    assert text.count(gpu.SECTION_START) == 1 and "(d2)" in text and "(d1)" not in text


def test_the_gpu_check_says_what_to_prepare_when_nothing_was_carried(tmp_path):
    if (ROOT / ".gpu-check" / "pnode-gpu.tar.gz").exists():
        pytest.skip("a bundle is prepared in this checkout: the check would run")
    script = ROOT / "scripts" / "gpu_check.sh"
    proc = subprocess.run(["bash", str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                          env=dict(os.environ, OUT=str(tmp_path / "out")))
    assert proc.returncode == 2
    assert "bash scripts/gpu_check.sh --prepare" in proc.stderr
