"""CUDA checks (skipped without a GPU) and a CPU run of benchmarks/gpu_check.py's code path.

On a machine with a GPU these run the correctness part of ``benchmarks/gpu_check.py``
check by check: float16, bfloat16 and float32 row storage, TrAct, the finite π-net,
MAML and compression on CUDA, each against a float64 CPU run of the same network and
batches with the tolerances stated there (``gpu_check.TOL``).
"""

import json

import pytest
import torch

from benchmarks import gpu_check

needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device (torch.cuda.is_available() is False)"
)


def _passed(rep: gpu_check.Report):
    assert rep.checks, "no check ran"
    for c in rep.checks:
        assert c["passed"] is not False, c


@needs_cuda
@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16"])
def test_cuda_storage_matches_float64_cpu(storage):
    rep = gpu_check.Report()
    gpu_check.check_storage(rep, torch.device("cuda"), storage, small=True)
    _passed(rep)


@needs_cuda
@pytest.mark.parametrize(
    "check", ["check_tract", "check_finite", "check_maml", "check_compress", "check_distributed"]
)
def test_cuda_features_match_float64_cpu(check):
    rep = gpu_check.Report()
    getattr(gpu_check, check)(rep, torch.device("cuda"), small=True)
    _passed(rep)


@needs_cuda
def test_cuda_low_precision_products_match_emulation():
    """The half-precision products with float32 accumulation (cuBLAS) agree with the same
    products on float32 copies of the half operands, to float32 rounding."""
    from inf import functional

    mm = getattr(functional, "mm_f32", None)
    if mm is None:
        pytest.skip("inf.functional has no mm_f32 (no low-precision product path)")
    gen = torch.Generator(device="cuda").manual_seed(0)
    for dt in (torch.float16, torch.bfloat16):
        a = torch.randn(8, 400, device="cuda", generator=gen).to(dt)
        b = torch.randn(4096, 400, device="cuda", generator=gen).to(dt)
        got = mm(a, b.T)
        want = a.float() @ b.float().T
        assert got.dtype == torch.float32
        assert torch.allclose(got, want, rtol=1e-5, atol=1e-4)


def test_gpu_check_without_cuda_prints_one_line(capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert gpu_check.main(["--device", "cuda"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and "no CUDA device" in out[0]


def test_gpu_check_code_path_on_cpu(tmp_path, capsys):
    """``--device cpu --small`` runs every check and the speed part, writes the JSON."""
    out = tmp_path / "g.json"
    torch.set_num_threads(1)
    rc = gpu_check.main(
        [
            "--device",
            "cpu",
            "--small",
            "--sizes",
            "0.001",
            "0.002",
            "--repeats",
            "1",
            "--skip-sharded",
            "--out",
            str(out),
        ]
    )
    text = capsys.readouterr().out
    assert rc == 0, text
    res = json.loads(out.read_text())
    names = [c["name"] for c in res["checks"]]
    for key in ("float32 rows", "float16 rows", "bfloat16 rows", "TrAct", "finite", "MAML"):
        assert any(key in n for n in names), (key, names)
    assert [s["M"] for s in res["sizes"]] == [1000, 2000]
    assert all(s["steps_per_s"] > 0 and s["row_read_GBps"] > 0 for s in res["sizes"])
    assert res["paper_run"]["paper_steps"] == 312_500
    assert "steps/s" in text


@pytest.mark.slow
def test_gpu_check_sharded_net_on_cpu():
    """The two-process sharded-net check of gpu_check (spawns two interpreters: slow)."""
    rep = gpu_check.Report()
    gpu_check.check_distributed(rep, torch.device("cpu"), small=True)
    _passed(rep)
    assert any("sharded" in c["name"] for c in rep.checks)
