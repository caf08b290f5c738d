"""experiments.tract: the CIFAR training program, its models and TrAct on their first layer.

All runs are tiny (a few images, width-reduced models, one or two epochs) on synthetic files
in the real CIFAR formats.
"""

from __future__ import annotations

import copy
import json
import shlex

import pytest
import torch
import torch.nn.functional as F

from experiments.data.cifar import CorruptDatasetError, DatasetNotFoundError
from experiments.data.synthetic import write_synthetic_cifar10, write_synthetic_cifar100
from experiments.tract import train_cifar
from experiments.tract.models import FIRST_LAYER, apply_tract, build_model

pytest.importorskip("inf.tract")

TINY = [
    "--batch_size",
    "4",
    "--train_subset",
    "8",
    "--test_subset",
    "4",
    "--no_progress",
    "--width_mult",
    "0.25",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models gain nothing from threads, and on a shared machine threads can wait on each
    other for seconds; restore the setting afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """One folder holding a CIFAR-10 folder and a CIFAR-100 archive, like ./data."""
    root = tmp_path_factory.mktemp("data")
    write_synthetic_cifar10(root, n_train=40, n_test=12, seed=0)
    write_synthetic_cifar100(root, n_train=120, n_test=12, seed=0, archive=True)
    return root


def _run(data_root, out, *extra):
    argv = ["--data", str(data_root), "--out", str(out), *TINY, *extra]
    return train_cifar.main(argv)


def _strip_times(rows):
    return [{k: v for k, v in row.items() if not k.endswith("_time_s")} for row in rows]


# --------------------------------------------------------------------------- command line


def test_official_command_lines_parse():
    lines = [
        "--method normal        --n_epochs 100 --lr 0.08 --optim sgd_w_momentum_cosine --seed 0",
        "--method tract --l 0.1 --n_epochs 100 --lr 0.08 --optim sgd_w_momentum_cosine --seed 0",
        "--method tract --l 0.1 --n_epochs 400 --lr 0.001 --optim adam_cosine --seed 0",
    ]
    parsed = [train_cifar.build_parser().parse_args(shlex.split(line)) for line in lines]
    assert [a.method for a in parsed] == ["normal", "tract", "tract"]
    assert parsed[2].n_epochs == 400 and parsed[2].lr == 0.001 and parsed[2].optim == "adam_cosine"
    assert parsed[1].l == 0.1 and parsed[0].batch_size == 128 and parsed[0].dataset == "cifar10"
    assert parsed[0].model == "resnet18"
    assert "tract_l0.1" in str(train_cifar.default_run_dir(parsed[1]))


def test_model_sizes_and_first_layers():
    resnet, vit = build_model("resnet18", 10), build_model("vit", 100)
    assert sum(p.numel() for p in resnet.parameters()) == 11_173_962
    assert 2.3e6 < sum(p.numel() for p in vit.parameters()) < 2.6e6
    assert resnet.conv1.kernel_size == (3, 3) and resnet.conv1.stride == (1, 1)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in resnet.modules())
    assert vit.patch_embed.kernel_size == (4, 4) and vit.patch_embed.stride == (4, 4)
    assert len(vit.blocks) == 12 and vit.pos_embed.shape == (1, 65, 128)
    with torch.no_grad():
        assert vit(torch.zeros(2, 3, 32, 32)).shape == (2, 100)


# --------------------------------------------------------------------------- end to end


@pytest.mark.parametrize(
    "model,method,dataset",
    [
        ("resnet18", "normal", "cifar10"),
        ("resnet18", "tract", "cifar100"),
        ("vit", "normal", "cifar100"),
        ("vit", "tract", "cifar10"),
    ],
)
def test_end_to_end(data_root, tmp_path, model, method, dataset):
    out = tmp_path / "run"
    doc = _run(
        data_root,
        out,
        "--model",
        model,
        "--method",
        method,
        "--dataset",
        dataset,
        "--n_epochs",
        "1",
        "--lr",
        "0.01",
        "--optim",
        "adam_cosine",
    )
    assert doc["config"]["method"] == method and doc["config"]["dataset"] == dataset
    (row,) = doc["epochs"]
    assert row["epoch"] == 1 and 0.0 <= row["test_acc"] <= 1.0
    assert all(torch.isfinite(torch.tensor(row[k])) for k in ("train_loss", "test_loss"))
    assert json.loads((out / "metrics.json").read_text()) == doc
    header, line = (out / "metrics.csv").read_text().splitlines()
    assert header.split(",")[:5] == ["epoch", "train_loss", "train_acc", "test_loss", "test_acc"]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    plain_keys = set(build_model(model, 10 if dataset == "cifar10" else 100, 0.25).state_dict())
    assert set(ckpt["model"]) == plain_keys  # TrAct keeps the state-dict keys
    assert ckpt["epoch"] == 1


def test_tract_only_changes_first_layer_weight_grad():
    """Same weights, same batch: every gradient but the input layer's weight is identical."""
    torch.manual_seed(0)
    x = torch.randn(6, 3, 32, 32)
    y = torch.arange(6) % 10
    for name, mode in (("resnet18", "train"), ("resnet18", "eval"), ("vit", "train")):
        torch.manual_seed(1)
        plain = build_model(name, 10, width_mult=0.25)
        wrapped = apply_tract(copy.deepcopy(plain), name, l=0.1)
        grads = []
        for model in (plain, wrapped):
            model.train(mode == "train")
            F.cross_entropy(model(x), y).backward()
            grads.append({k: p.grad.clone() for k, p in model.named_parameters()})
        first_weight = f"{FIRST_LAYER[name]}.weight"
        assert grads[0].keys() == grads[1].keys()
        for key in grads[0]:
            if key == first_weight:
                assert not torch.allclose(grads[0][key], grads[1][key], rtol=1e-2)
            else:
                torch.testing.assert_close(
                    grads[1][key], grads[0][key], rtol=1e-6, atol=1e-9, msg=f"{name}/{mode}: {key} changed"
                )


def test_tract_with_huge_lambda_is_plain_gradient_over_lambda():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    plain = build_model("resnet18", 10, width_mult=0.25).eval()
    wrapped = apply_tract(copy.deepcopy(plain), "resnet18", l=1e6)
    for model in (plain, wrapped):
        F.cross_entropy(model(x), y).backward()
    torch.testing.assert_close(wrapped.conv1.weight.grad * 1e6, plain.conv1.weight.grad, rtol=1e-3, atol=1e-7)


# --------------------------------------------------------------------------- resume


def test_resume_equals_uninterrupted_run(data_root, tmp_path, capsys):
    common = [
        "--method",
        "tract",
        "--l",
        "0.1",
        "--n_epochs",
        "2",
        "--lr",
        "0.05",
        "--optim",
        "sgd_w_momentum_cosine",
        "--seed",
        "3",
    ]
    straight = _run(data_root, tmp_path / "straight", *common)
    first = _run(data_root, tmp_path / "split", *common, "--stop_after_epochs", "1")
    assert len(first["epochs"]) == 1
    # a crash while writing left a temporary of a process that is gone: the resume removes it
    stale = tmp_path / "split" / f".checkpoint.pt.tmp{2**22 + 4321}"
    stale.write_bytes(b"torn")
    resumed = _run(data_root, tmp_path / "split", *common)
    assert not stale.exists()
    assert _strip_times(resumed["epochs"]) == _strip_times(straight["epochs"])
    a = torch.load(tmp_path / "straight" / "checkpoint.pt", weights_only=True)
    b = torch.load(tmp_path / "split" / "checkpoint.pt", weights_only=True)
    for key, value in a["model"].items():
        assert torch.equal(value, b["model"][key]), key
    assert a["scheduler"] == b["scheduler"]
    assert torch.equal(a["rng"]["data"], b["rng"]["data"])
    for k, state in a["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], b["optimizer"]["state"][k]["momentum_buffer"])
    # running again has nothing left to do, and says how the run ended (on stdout)
    capsys.readouterr()
    again = _run(data_root, tmp_path / "split", *common)
    assert _strip_times(again["epochs"]) == _strip_times(straight["epochs"])
    out = capsys.readouterr().out
    assert "2 epochs, final test accuracy" in out and "already finished" in out
    assert f"{100 * straight['summary']['final_test_acc']:.2f}%" in out


def test_resume_refuses_a_different_run(data_root, tmp_path):
    _run(
        data_root,
        tmp_path,
        "--method",
        "normal",
        "--n_epochs",
        "2",
        "--stop_after_epochs",
        "1",
        "--model",
        "vit",
    )
    with pytest.raises(train_cifar.ConfigError, match="method"):
        _run(data_root, tmp_path, "--method", "tract", "--n_epochs", "2", "--model", "vit")
    fresh = _run(data_root, tmp_path, "--method", "tract", "--n_epochs", "1", "--model", "vit", "--overwrite")
    assert fresh["config"]["method"] == "tract" and len(fresh["epochs"]) == 1


# --------------------------------------------------------------------------- errors, plots


def test_corrupt_and_missing_data_give_clear_errors(tmp_path):
    folder = write_synthetic_cifar10(tmp_path / "data", n_train=20, n_test=4)
    raw = (folder / "data_batch_4").read_bytes()
    (folder / "data_batch_4").write_bytes(raw[:100])
    with pytest.raises(CorruptDatasetError, match="data_batch_4"):
        _run(tmp_path / "data", tmp_path / "out", "--method", "normal", "--n_epochs", "1")
    with pytest.raises(DatasetNotFoundError, match="cifar-100-python"):
        _run(
            tmp_path / "data",
            tmp_path / "out",
            "--method",
            "normal",
            "--n_epochs",
            "1",
            "--dataset",
            "cifar100",
        )


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_gpu_is_a_clear_error(data_root, tmp_path):
    with pytest.raises(train_cifar.ConfigError, match="no CUDA GPU"):
        _run(data_root, tmp_path, "--method", "normal", "--device", "cuda")


def test_compare_writes_a_png(data_root, tmp_path):
    runs = []
    for method in ("normal", "tract"):
        out = tmp_path / method
        _run(
            data_root,
            out,
            "--method",
            method,
            "--n_epochs",
            "2",
            "--model",
            "vit",
            "--optim",
            "adam",
            "--lr",
            "0.003",
        )
        runs.append(str(out))
    png = tmp_path / "cmp.png"
    summary = train_cifar.main(["--compare", *runs, "--plot", str(png)])
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [r["epochs"] for r in summary["runs"]] == [2, 2]
    assert len(summary["groups"]) == 2 and "TrAct" in summary["groups"][1]["label"]
