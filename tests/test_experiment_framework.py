"""The shared experiment framework: one-line user errors, safe checkpoint loading, run folders,
atomic writes, model kinds, and the options every program shares.

All programs run in-process through their ``main``/``_cli`` with tiny synthetic data; nothing
here trains for more than a few steps.
"""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from experiments import cli, quickstart, runs
from experiments.cifar10 import cifar10mlp, cifar10test
from experiments.data.synthetic import write_synthetic_cifar10
from experiments.imagenet import transfer_imagenet
from experiments.meta import test as meta_test
from experiments.meta import train as meta_train
from experiments.meta.synthetic import write_synthetic_omniglot
from experiments.models import KINDS, ModelSpec, build_model, canonical_kind, kind_of
from experiments.tract import plot as tract_plot
from experiments.tract import train_cifar
from inf.networks import FinPiMLPSample, InfMLP, MuMLP


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return write_synthetic_cifar10(tmp_path_factory.mktemp("cifar"), n_train=32, n_test=16)


@pytest.fixture(scope="module")
def omni_root(tmp_path_factory):
    return write_synthetic_omniglot(tmp_path_factory.mktemp("omniglot"), 2, 4, 3, size=28)


def tiny(cifar, *extra):
    return [
        "--data",
        str(cifar),
        "--float",
        "--r",
        "4",
        "--no-progress",
        "--epochs",
        "1",
        "--batch-size",
        "16",
        *map(str, extra),
    ]


def one_line_error(capsys, run, *args) -> str:
    """Run ``run(*args)``; it must exit with status 2 and print exactly one line on stderr."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as info:
        run(*args)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("python -m experiments."), err
    assert "Traceback" not in err and "usage:" not in err
    return err


# --------------------------------------------------------------------------- crafted checkpoints


class _Exploit:
    """Unpickling this object would create the marker file."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _crafted(path: Path, marker: Path, wrap: bool = True) -> Path:
    payload = _Exploit(marker)
    doc = (
        {"format": runs.CHECKPOINT_FORMAT, "version": runs.CHECKPOINT_VERSION, "model": payload}
        if wrap
        else payload
    )
    if wrap:
        torch.save(doc, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(doc, fh)
    return path


def test_crafted_pickle_never_runs(tmp_path):
    """The test's own premise: an ordinary unpickle of the file does create the marker."""
    marker = tmp_path / "ran"
    path = _crafted(tmp_path / "x.pt", marker)
    torch.load(path, weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("wrap", [True, False], ids=["torch.save", "raw-pickle"])
def test_every_load_path_refuses_a_crafted_checkpoint(tmp_path, cifar, omni_root, capsys, wrap):
    """Every program that reads a checkpoint or model file, given a crafted pickle: one line,
    exit status 2, nothing executed, and no advice to load it with weights_only=False."""
    marker = tmp_path / "exploit_ran"
    evil = _crafted(tmp_path / "evil.pt", marker, wrap)
    errors = [
        one_line_error(capsys, cifar10mlp._cli, tiny(cifar, "--model-path", evil)),
        one_line_error(capsys, cifar10mlp._cli, tiny(cifar, "--model-path", evil, "--evaluate-only")),
        one_line_error(
            capsys, cifar10test._cli, ["--data", str(cifar), "--test-kernel", "--load-model-path", str(evil)]
        ),
        one_line_error(
            capsys, transfer_imagenet._cli, ["--model-path", str(evil), "--no-transfer", "--float"]
        ),
    ]
    meta_argv = [
        str(omni_root),
        "--num-ways",
        "2",
        "--num-shots",
        "1",
        "--num-shots-test",
        "1",
        "--split-sizes",
        "proportional",
        "--infnet_r",
        "4",
        "--adapt-readout-only",
        "--num-epochs",
        "0",
        "--no-progress",
        "--batch-size",
        "1",
    ]
    errors.append(one_line_error(capsys, meta_train.main, meta_argv + ["--load-model-path", str(evil)]))
    # meta.test reads RUN/model.pt: make a real run folder, then replace its model
    meta_train.main(meta_argv + ["--output-folder", str(tmp_path / "meta")])
    capsys.readouterr()
    (run,) = (tmp_path / "meta").iterdir()
    (run / meta_train.BEST_MODEL).write_bytes(evil.read_bytes())
    errors.append(one_line_error(capsys, meta_test.main, [str(run), "--no-progress"]))
    # train_cifar resumes RUN/checkpoint.pt from --out
    out = tmp_path / "tract"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(evil.read_bytes())
    errors.append(
        one_line_error(
            capsys,
            train_cifar._cli,
            [
                "--method",
                "normal",
                "--dataset",
                "digits",
                "--out",
                str(out),
                "--n_epochs",
                "1",
                "--batch_size",
                "8",
                "--train_subset",
                "16",
                "--test_subset",
                "8",
                "--model",
                "vit",
                "--width_mult",
                "0.25",
                "--no_progress",
            ],
        )
    )
    assert not marker.exists()
    for err in errors:
        assert "weights_only" not in err and "not a readable" in err, err
        assert "could run code" in err or "damaged" in err


def test_damaged_and_foreign_checkpoints_are_one_line(tmp_path, cifar, capsys):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"\x00" * 64)
    assert "damaged" in one_line_error(capsys, cifar10mlp._cli, tiny(cifar, "--model-path", junk))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    err = one_line_error(
        capsys, cifar10test._cli, ["--data", str(cifar), "--test-kernel", "--load-model-path", str(foreign)]
    )
    assert "not a checkpoint of these programs" in err
    missing = one_line_error(capsys, cifar10mlp._cli, tiny(cifar, "--model-path", tmp_path / "none.pt"))
    assert "--model-path" in missing and "does not exist" in missing


# --------------------------------------------------------------------------- option errors


@pytest.mark.parametrize(
    "program,argv,words",
    [
        (cifar10mlp._cli, ["--lr", "-1"], "--lr"),
        (cifar10mlp._cli, ["--r", "0"], "--r"),
        (cifar10mlp._cli, ["--wd", "-0.1"], "--wd"),
        (cifar10mlp._cli, ["--lr", "nan"], "--lr"),
        (cifar10test._cli, ["--gp", "--varb", "-1"], "--varb"),
        (transfer_imagenet._cli, ["--lr", "-0.01"], "--lr"),
        (quickstart.main, ["--lr", "-2"], "--lr"),
        (quickstart.main, ["--r", "0"], "--r"),
        (train_cifar._cli, ["--method", "normal", "--lr", "-0.1"], "--lr"),
        (tract_plot.main, ["--threads", "0", "somewhere"], "--threads"),
        (meta_test.main, ["somewhere", "--threads", "-1"], "--threads"),
    ],
    ids=[
        "lr",
        "r",
        "wd",
        "lr-nan",
        "varb",
        "transfer-lr",
        "quickstart-lr",
        "quickstart-r",
        "tract-lr",
        "plot-threads",
        "meta-test-threads",
    ],
)
def test_bad_option_values_are_one_line(capsys, program, argv, words):
    err = one_line_error(capsys, program, argv)
    assert words in err and "—" in err


@pytest.mark.parametrize("flag,value", [("--meta-lr", "-0.1"), ("--step-size", "-0.5"), ("--infnet_r", "0")])
def test_meta_option_values_are_one_line(capsys, omni_root, flag, value):
    err = one_line_error(capsys, meta_train.main, [str(omni_root), "--adapt-readout-only", flag, value])
    assert flag in err


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_gpu_flags_without_gpu_say_drop_the_flag(capsys, cifar, omni_root):
    assert "drop --cuda" in one_line_error(capsys, cifar10test._cli, ["--data", str(cifar), "--gp", "--cuda"])
    assert "drop --use-cuda" in one_line_error(
        capsys, meta_train.main, [str(omni_root), "--adapt-readout-only", "--use-cuda"]
    )
    assert "--device cpu" in one_line_error(
        capsys, train_cifar._cli, ["--method", "normal", "--device", "cuda"]
    )


def test_every_program_takes_threads():
    parsers = [
        cifar10mlp.build_parser(),
        cifar10test.build_parser(),
        transfer_imagenet.build_parser(),
        meta_train.build_parser(),
        meta_test.build_parser(),
        train_cifar.build_parser(),
    ]
    for parser in parsers:
        assert any("--threads" in a.option_strings for a in parser._actions), parser.prog
    assert quickstart.parse_args(["--threads", "1"]).threads == 1


def test_help_texts():
    text = " ".join(cifar10mlp.build_parser().format_help().split())  # wrapping undone
    flag = text[text.rindex("--no-apply-lr-mult-to-wd ") :]
    flag = flag[: flag.index("--gclip ")]
    assert "default: True" not in flag and "default: False" not in flag
    loss = text[text.rindex("--loss {xent,mse} ") :]
    assert (
        "mse: mean over the C classes of (f_c - t_c)² with centred one-hot targets t = "
        "onehot(y) - 1/C" in loss[:300]
    )
    # the ImageNet program shares the one meaning of --loss mse
    assert "onehot(y) - 1/C" in " ".join(transfer_imagenet.build_parser().format_help().split())


# --------------------------------------------------------------------------- run folders


def test_runs_of_different_kinds_land_in_different_folders(tmp_path, cifar, capsys):
    """The infinite-net run and the μP run with the same --save-dir keep their own metrics
    (the μP run used to replace the infinite run's files)."""
    inf = cifar10mlp.main(tiny(cifar, "--save-dir", tmp_path))
    mup = cifar10mlp.main(tiny(cifar, "--save-dir", tmp_path, "--width", 16, "--gaussian-init"))
    a, b = Path(inf["run_dir"]), Path(mup["run_dir"])
    assert a != b and a.parent == b.parent == tmp_path
    assert a.name.startswith("cifar10mlp_infinite_r4_") and b.name.startswith("cifar10mlp_mup_w16_")
    assert json.loads((a / "metrics.json").read_text())["epochs"][0]["rows"] is not None
    assert json.loads((b / "metrics.json").read_text())["epochs"][0]["rows"] is None
    # the same command again: the finished run is not retrained, its result line is printed
    capsys.readouterr()
    again = cifar10mlp.main(tiny(cifar, "--save-dir", tmp_path))
    out = capsys.readouterr().out
    assert "already finished" in out and "final test accuracy" in out
    assert again["epochs"] == json.loads(json.dumps(inf["epochs"]))
    # more epochs is another configuration (another folder); an unfinished folder is refused
    stopped = cifar10mlp.main(
        tiny(cifar, "--save-dir", tmp_path, "--epochs", 2, "--save-model", "--stop-after-epochs", 1)
    )
    with pytest.raises(runs.RunExists, match="--overwrite"):
        cifar10mlp.main(tiny(cifar, "--save-dir", tmp_path, "--epochs", 2, "--save-model"))
    redo = cifar10mlp.main(tiny(cifar, "--save-dir", tmp_path, "--epochs", 2, "--save-model", "--overwrite"))
    assert redo["run_dir"] == stopped["run_dir"] and len(redo["epochs"]) == 2


def test_stale_temporaries_are_removed(tmp_path):
    dead = 2**22 + 12345  # above the default pid_max: no such process
    while True:
        try:
            os.kill(dead, 0)
            dead += 1
        except ProcessLookupError:
            break
        except PermissionError:
            dead += 1
    stale = tmp_path / f".checkpoint.pt.tmp{dead}"
    stale.write_bytes(b"half a checkpoint")
    live = tmp_path / f".metrics.json.tmp{os.getpid()}"
    live.write_bytes(b"being written")
    runs.atomic_write(tmp_path / "metrics.csv", lambda fh: fh.write(b"epoch\n"))
    assert not stale.exists() and live.exists()
    assert (tmp_path / "metrics.csv").read_bytes() == b"epoch\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["metrics.csv", live.name])


def test_checkpoint_round_trip_and_version(tmp_path):
    path = tmp_path / runs.CHECKPOINT_NAME
    runs.save_checkpoint(path, {"program": "p", "model": {"w": torch.arange(3.0)}, "epoch": 2})
    ckpt = runs.load_checkpoint(tmp_path, program="p")
    assert ckpt["version"] == runs.CHECKPOINT_VERSION and ckpt["epoch"] == 2
    assert torch.equal(ckpt["model"]["w"], torch.arange(3.0))
    with pytest.raises(cli.ConfigError, match="written by p, not q"):
        runs.load_checkpoint(path, program="q")
    torch.save({"format": runs.CHECKPOINT_FORMAT, "version": runs.CHECKPOINT_VERSION + 1}, path)
    with pytest.raises(cli.ConfigError, match="newer"):
        runs.load_checkpoint(path)
    # the first format (no version field) still loads
    torch.save({"format": "pilimit-experiment-checkpoint/1", "epoch": 1}, path)
    assert runs.load_checkpoint(path)["version"] == 1
    torch.save({"format": 1, "config": {}, "epoch": 1}, path)  # the TrAct program's first format
    assert runs.load_checkpoint(path)["version"] == 1


def test_one_epoch_plot_has_markers(tmp_path):
    fig = runs.plot_curves(
        [{"epoch": 1, "train_loss": 2.0, "test_loss": 2.1, "train_acc": 0.2, "test_acc": 0.3}],
        tmp_path / "c.png",
    )
    lines = [line for ax in fig.axes for line in ax.get_lines()]
    assert len(lines) == 4 and all(line.get_marker() == "o" for line in lines)
    assert fig.get_figwidth() * fig.dpi >= 1200
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


def test_progress_bars_are_quiet_off_a_terminal(capsys):
    bar = cli.progress_bar(range(3), enabled=True, nested=True)
    assert bar.disable  # pytest's stderr is not a terminal
    list(bar)
    assert capsys.readouterr().err == ""


# --------------------------------------------------------------------------- model kinds


def test_model_kinds_and_aliases():
    assert KINDS == ("infinite", "finite", "mup")
    for alias, kind in (
        ("inf", "infinite"),
        ("fin", "finite"),
        ("mu", "mup"),
        ("MuP", "mup"),
        ("infinite", "infinite"),
    ):
        assert canonical_kind(alias) == kind
    with pytest.raises(cli.ConfigError, match="infinite, finite, mup"):
        canonical_kind("wide")
    expected = {"infinite": InfMLP, "finite": FinPiMLPSample, "mup": MuMLP}
    for kind in KINDS:
        spec = ModelSpec(
            kind, 6, 3, r=4, width=None if kind == "infinite" else 8, depth=1, bias_alpha=0.5, seed=3
        )
        net = build_model(spec)
        assert isinstance(net, expected[kind]) and kind_of(net) == kind
        assert net(torch.randn(2, 6)).shape == (2, 3)
        # the same spec builds the same network
        again = build_model(spec)
        assert all(torch.equal(a, b) for a, b in zip(net.parameters(), again.parameters()))
        assert ModelSpec.from_dict(spec.as_dict()) == spec
    with pytest.raises(cli.ConfigError, match="width"):
        ModelSpec("finite", 6, 3)


def test_float16_rows_spec():
    net = build_model(ModelSpec("inf", 6, 3, r=4, rows_dtype=torch.float16))
    layer = net.output_layer
    assert layer.rows.A.dtype == torch.float16 and net.input_layer.A.dtype == torch.float32


def test_run_main_reports_user_errors_only(tmp_path, capsys):
    def writes_into_a_missing_folder(argv):
        open(tmp_path / "no" / "such" / "folder" / "x.json", "w")

    with pytest.raises(SystemExit) as info:
        cli.run_main(writes_into_a_missing_folder, "prog")
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.startswith("prog: error: ") and err.count("\n") == 1
    assert "x.json" in err and "No such file" in err

    def has_a_bug(argv):
        raise RuntimeError("internal")

    with pytest.raises(RuntimeError, match="internal"):  # a bug keeps its traceback
        cli.run_main(has_a_bug, "prog")
