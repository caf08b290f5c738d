"""experiments.table1 end to end on a tiny digits run (1 seed, 2 epochs, 400 training images)."""

from __future__ import annotations

import json
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from experiments import table1

ROOT = Path(__file__).resolve().parents[1]
TINY = [
    "--seeds",
    "1",
    "--epochs",
    "2",
    "--train-size",
    "400",
    "--test-size",
    "150",
    "--r",
    "16",
    "--width",
    "256",
    "--no-progress",
]


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    save = tmp_path_factory.mktemp("table1")
    return save, table1.main(TINY + ["--save-dir", str(save)])


def test_tiny_digits_table(tiny_run):
    """Every method is in the table, with one run each, an accuracy above chance and a time.

    Chance is 0.1 (ten balanced classes). Measured for this tiny run: infinite and finite π-net
    ≈ 0.35 (two epochs on 400 images at r = 16 are few steps for a net whose output starts at
    0), μP MLP ≈ 0.84, NNGP and NTK ≈ 0.96. We require more than twice chance for the
    networks and more than 0.8 for the kernels, which a broken kernel or a net that does not
    learn would not reach.
    """
    save, doc = tiny_run
    results = doc["results"]
    assert list(results) == list(table1.METHODS)
    for method, r in results.items():
        assert len(r["runs"]) == 1 and r["runs"][0]["seed"] == 0
        assert r["time_s"] > 0 and r["sd"] == 0.0
        assert 0.0 <= r["mean"] <= 1.0
        floor = 0.8 if method in ("NNGP", "NTK") else 0.2
        assert r["mean"] > floor, (method, r["mean"])
    for method in table1.NETWORKS:  # scored by their learned feature kernel as well
        assert results[method]["feature_kernel_mean"] > 0.2
    assert doc["train_size"] == 400 and doc["test_size"] == 150
    # the printed table: a header, a rule and one row per method
    lines = doc["table"].splitlines()
    assert len(lines) == 2 + len(table1.METHODS)
    assert "mean ± sd" in lines[0]
    for line, method in zip(lines[2:], table1.METHODS):
        assert line.startswith(f"| {method}") and "±" in line
    out = save / "table1_digits"
    assert (out / "table.md").read_text().strip() == doc["table"]
    assert json.loads((out / "results.json").read_text())["results"].keys() == results.keys()
    width, height = _png_size(out / "table1.png")
    assert width >= 1200 and height >= 500


def test_refuses_to_overwrite_and_reports_user_errors_in_one_line(tiny_run, tmp_path):
    save, _ = tiny_run
    with pytest.raises(table1.UserError, match="--overwrite"):
        table1.main(TINY + ["--save-dir", str(save)])
    with pytest.raises(table1.UserError, match="--data DIR"):
        table1.main(["--dataset", "cifar10", "--save-dir", str(tmp_path)])
    with pytest.raises(table1.UserError, match="--methods"):
        table1.main(["--methods", "gp", "--save-dir", str(tmp_path)])
    with pytest.raises(table1.UserError, match="--lr"):
        table1.main(["--lr", "-1", "--save-dir", str(tmp_path)])
    proc = subprocess.run(
        [sys.executable, "-m", "experiments.table1", "--seeds", "0"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip() == "error: --seeds must be at least 1, got 0"


def test_cifar10_uses_the_same_code_path(tmp_path):
    """``--dataset cifar10 --data DIR`` on tiny synthetic CIFAR-10 files: the two kernel rows
    (the network rows are the digits code path, exercised above) classify class templates."""
    from experiments.data.synthetic import write_synthetic_cifar10

    root = write_synthetic_cifar10(tmp_path / "data", n_train=200, n_test=60, seed=0)
    data = table1.load_dataset("cifar10", str(root))
    assert data.X_train.shape == (200, 3072) and data.X_test.shape == (60, 3072)
    norms = data.X_train.norm(dim=1)
    assert 0.5 < float(norms.mean()) < 1.5  # standardised and divided by √d
    doc = table1.main(
        [
            "--dataset",
            "cifar10",
            "--data",
            str(root),
            "--methods",
            "NNGP,NTK",
            "--seeds",
            "1",
            "--save-dir",
            str(tmp_path / "out"),
            "--no-progress",
        ]
    )
    assert list(doc["results"]) == ["NNGP", "NTK"]
    assert all(r["mean"] > 0.5 for r in doc["results"].values())  # chance 0.1
    assert "paper" in doc["table"].splitlines()[0]
