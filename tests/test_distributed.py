"""Distributed π-nets (inf.distributed): 2 gloo processes on the CPU, spawned by the tests.

Every check compares a distributed run with the single-process run it must
reproduce. The reference runs inside each worker (the nets are tiny), so one
spawned job holds several checks; the job returns the measured differences and
the assertions run here, in the pytest process.

Tolerance 1e-10 in float64: a sharded layer sums its rows in two partial sums
added by the all-reduce instead of one running sum, so results differ from one
process only by rounding (observed differences are ~1e-15); a real error (a row
lost, counted twice, a wrong scale) moves outputs by far more than 1e-10.

The harness gives every job a deadline: a hung collective fails the test within
seconds instead of blocking the suite. Workers start from a fork server that has
imported torch and this module once (measured: 7 s for the first job, 0.3 s for
each later one, against 14 s per job with plain spawn on this loaded machine).
"""

from __future__ import annotations

import io
import json
import multiprocessing
import os
import socket
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

F64 = torch.float64
TOL = 1e-10


# --------------------------------------------------------------------------- harness
def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world: int, port: int, out_dir: str, args: tuple):
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        result = fn(rank, world, *args)
        torch.save(result, Path(out_dir) / f"result{rank}.pt")
    except Exception as err:
        # when one rank fails, its peers fail next (connection reset in their collective);
        # the time stamp tells the harness which error came first
        (Path(out_dir) / f"error{rank}.txt").write_text(f"{time.time():.6f}\n{type(err).__name__}: {err}")
        raise
    finally:
        dist.destroy_process_group()


class DistributedJobError(RuntimeError):
    """A rank of a test job raised; the message names the rank whose error came first."""


def run_distributed(fn, *args, world: int = 2, timeout: float = 90.0) -> list:
    """Run ``fn(rank, world, *args)`` in ``world`` spawned processes joined by a gloo group on
    127.0.0.1; returns every rank's return value (tensors, numbers, dicts of them).

    An exception on any rank ends the job (the others are terminated) and is raised here as
    :class:`DistributedJobError` naming the rank that failed first and its message (like
    torchrun's "root cause"); a job still running after ``timeout`` seconds is killed and
    fails with TimeoutError.
    """
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    if method == "forkserver":
        # torch._dynamo: the first optimizer a process builds imports it (5 s here)
        multiprocessing.set_forkserver_preload(
            [
                "torch",
                "torch._dynamo",
                "torch.distributed",
                "inf.networks",
                "inf.optim",
                "inf.utils",
                "inf.distributed",
                __name__,
            ]
        )
    with tempfile.TemporaryDirectory() as out_dir:
        ctx = mp.start_processes(
            _entry,
            args=(fn, world, _free_port(), out_dir, args),
            nprocs=world,
            join=False,
            start_method=method,
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=0.2):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"distributed job did not finish within {timeout:.0f} s")
        except mp.ProcessRaisedException:
            errors = sorted(
                (float(f.read_text().split("\n", 1)[0]), int(f.stem[5:]), f.read_text().split("\n", 1)[1])
                for f in Path(out_dir).glob("error*.txt")
            )
            if not errors:
                raise
            _, first, message = errors[0]
            raise DistributedJobError(f"rank {first} failed first: {message}") from None
        finally:
            for p in ctx.processes:  # only the processes this call started
                if p.is_alive():
                    p.kill()
                    p.join(5)
        return [torch.load(Path(out_dir) / f"result{k}.pt", weights_only=True) for k in range(world)]


# --------------------------------------------------------------------------- shared pieces
def _net(seed: int, layernorm: bool = False, tract: bool = False, **kw):
    from inf.networks import InfMLP

    torch.manual_seed(seed)
    return InfMLP(
        6,
        3,
        r=5,
        L=2,
        layernorm=layernorm,
        tract_lambda=0.1 if tract else None,
        bias_alpha=0.7,
        first_layer_alpha=1.3,
        last_layer_alpha=2.0,
        dtype=F64,
        **kw,
    )


def _opt(net, momentum: float = 0.9, wd: float = 1e-3):
    from inf.optim import InfSGD
    from inf.utils import pi_param_groups

    groups = pi_param_groups(net, lr=0.5, weight_decay=wd, first_layer_lr_mult=0.5, bias_lr_mult=0.8)
    return InfSGD(groups, lr=0.5, momentum=momentum, weight_decay=wd)


def _batches(n: int, batch: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, 6, generator=g, dtype=F64), torch.randint(0, 3, (batch,), generator=g))
        for _ in range(n)
    ]


def _step(net, opt, x, y, clip: float = 0.5, per_param: bool = True) -> float:
    from inf.utils import clip_grad_norm_

    opt.zero_grad()
    loss = F.cross_entropy(net(x), y)
    loss.backward()
    clip_grad_norm_(net.parameters(), clip, per_param=per_param)
    opt.step()
    return loss.item()


def _train(net, opt, batches, per_param: bool = True) -> torch.Tensor:
    return torch.tensor([_step(net, opt, x, y, per_param=per_param) for x, y in batches], dtype=F64)


def _maxdiff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max())


# --------------------------------------------------------------------------- workers
def _sharded_vs_single(rank: int, world: int) -> dict:
    """20 steps sharded over the group vs one process (momentum, weight decay, clipping per parameter;
    with layernorm, global clipping; with TrAct on the input layer, 5 steps)."""
    import inf.distributed as idist

    out = {}
    x_test = torch.randn(7, 6, generator=torch.Generator().manual_seed(9), dtype=F64)
    batches = _batches(20, 4)
    for name, kw in (("plain", {}), ("layernorm", {"layernorm": True}), ("tract", {"tract": True})):
        ref, sharded = _net(0, **kw), _net(0, **kw)
        idist.shard_(sharded)
        with torch.no_grad():  # the output layer starts at zero: compare what enters it
            before = _maxdiff(ref.features(x_test), sharded.features(x_test))
        steps = batches if name != "tract" else batches[:5]  # TrAct acts on the replicated input layer only
        per_param = name != "layernorm"  # global clipping in one configuration
        loss_ref = _train(ref, _opt(ref), steps, per_param)
        loss_sh = _train(sharded, _opt(sharded), steps, per_param)
        with torch.no_grad():
            out[name] = {
                "init": before,
                "loss": _maxdiff(loss_ref, loss_sh),
                "out": _maxdiff(ref(x_test), sharded(x_test)),
                "rows_ref": torch.tensor(ref.rows_per_layer()),
                "rows_local": torch.tensor(sharded.rows_per_layer()),
                "rows_global": torch.tensor(idist.global_rows_per_layer(sharded)),
            }
        if name == "plain":
            # MAML's inner loop: temporary rows appended to the readout (the same on every process)
            g = torch.Generator().manual_seed(4)
            A_t, B_t = torch.randn(6, 3, generator=g, dtype=F64), torch.randn(6, 5, generator=g, dtype=F64)
            B_t = F.normalize(B_t, dim=1)
            rows_before = sharded.rows_per_layer()
            with ref.output_layer.rows.temporary_rows(), sharded.output_layer.rows.temporary_rows():
                ref.output_layer.rows.append(A_t, B_t, -0.3)
                sharded.output_layer.rows.append(A_t, B_t, -0.3)
                with torch.no_grad():
                    out["temporary_rows"] = _maxdiff(ref(x_test), sharded(x_test))
            out["temporary_rows_restored"] = (
                sharded.rows_per_layer() == rows_before
                and idist.global_rows_per_layer(sharded) == ref.rows_per_layer()
            )
            # a finite net sampled from the sharded net is the one sampled from the whole net
            fin_ref = ref.sample(40, generator=torch.Generator().manual_seed(5))
            fin_sh = sharded.sample(40, generator=torch.Generator().manual_seed(5))
            with torch.no_grad():
                out["sample"] = _maxdiff(fin_ref(x_test), fin_sh(x_test))
            # gathering gives back the single-process net, rows in the same order
            idist.gather_(sharded)
            out["gathered_rows"] = _maxdiff(
                torch.cat([m.rows.B for m in ref.pi_layers]), torch.cat([m.rows.B for m in sharded.pi_layers])
            )
            out["gathered_out"] = _maxdiff(ref(x_test).detach(), sharded(x_test).detach())
    return out


def _data_parallel(rank: int, world: int) -> dict:
    """Each rank trains on its half of every batch; the reference on the whole batch."""
    import inf.distributed as idist

    batches = _batches(10, 8, seed=3)
    ref, dp = _net(0), _net(0)
    idist.data_parallel_(dp)
    loss_ref = _train(ref, _opt(ref), batches)
    half = [(x[rank * 4 : (rank + 1) * 4], y[rank * 4 : (rank + 1) * 4]) for x, y in batches]
    _train(dp, _opt(dp), half)
    x_test = torch.randn(7, 6, generator=torch.Generator().manual_seed(9), dtype=F64)
    try:  # TrAct's preconditioner needs the whole batch
        idist.data_parallel_(_net(0, tract=True))
        refused = ""
    except ValueError as err:
        refused = str(err)
    with torch.no_grad():
        return {
            "out": _maxdiff(ref(x_test), dp(x_test)),
            "rows_ref": torch.tensor(ref.rows_per_layer()),
            "rows_dp": torch.tensor(dp.rows_per_layer()),
            "ref_loss_last": float(loss_ref[-1]),
            "tract_refused": refused,
        }


def _checkpoints(rank: int, world: int, folder: str) -> dict:
    """Save with 2 and load with 2 (resume) and 1; save with 1 and load with 2."""
    import inf.distributed as idist

    folder = Path(folder)
    first, second = _batches(5, 4, seed=5), _batches(5, 4, seed=6)
    x_test = torch.randn(7, 6, generator=torch.Generator().manual_seed(9), dtype=F64)
    out = {}

    # uninterrupted single-process reference (10 steps), saved after 5 by rank 0 only
    ref = _net(0)
    ref_opt = _opt(ref)
    _train(ref, ref_opt, first)
    if rank == 0:
        idist.save_checkpoint(folder / "single", ref, ref_opt, extra={"step": 5})
    _train(ref, ref_opt, second)
    ref_out = ref(x_test).detach()

    # sharded run, saved after 5 steps by both ranks, then continued
    net = idist.shard_(_net(0))
    opt = _opt(net)
    _train(net, opt, first)
    idist.save_checkpoint(folder / "sharded", net, opt, extra={"step": 5})
    # the programs' format: the single-process state, gathered (a torch.save round trip)
    buf = io.BytesIO()
    torch.save(
        {"model": idist.full_state_dict(net), "optimizer": idist.full_optimizer_state_dict(net, opt)}, buf
    )
    full_bytes = buf.getvalue()
    _train(net, opt, second)
    sharded_out = net(x_test).detach()
    out["sharded_vs_ref"] = _maxdiff(sharded_out, ref_out)

    # resume with the same 2 processes: must reproduce the uninterrupted run exactly
    net2 = idist.shard_(_net(123))
    opt2 = _opt(net2)
    extra = idist.load_checkpoint(folder / "sharded", net2, opt2)
    out["extra_step"] = extra["step"]
    _train(net2, opt2, second)
    out["resume_2_to_2"] = _maxdiff(net2(x_test).detach(), sharded_out)

    # the gathered single-process state into 2 processes and into 1
    # (a fresh copy for each net: optimizer.load_state_dict shares the tensors it is given)
    full = torch.load(io.BytesIO(full_bytes), weights_only=True)
    net4 = idist.shard_(_net(13))
    opt4 = _opt(net4)
    net4.load_state_dict(full["model"])
    idist.load_full_optimizer_state_dict(net4, opt4, full["optimizer"])
    _train(net4, opt4, second)
    out["full_state_2_to_2"] = _maxdiff(net4(x_test).detach(), sharded_out)
    full = torch.load(io.BytesIO(full_bytes), weights_only=True)
    net5 = _net(17)
    opt5 = _opt(net5)
    net5.load_state_dict(full["model"])
    opt5.load_state_dict(full["optimizer"])
    _train(net5, opt5, second)
    out["full_state_2_to_1"] = _maxdiff(net5(x_test).detach(), ref_out)

    # 2 -> 1: a plain net in one process (rank 0 only; no collective involved)
    if rank == 0:
        net1 = _net(7)
        opt1 = _opt(net1)
        idist.load_checkpoint(folder / "sharded", net1, opt1)
        _train(net1, opt1, second)
        out["resume_2_to_1"] = _maxdiff(net1(x_test).detach(), ref_out)
        out["rows_2_to_1"] = torch.tensor(net1.rows_per_layer())
    dist.barrier()

    # 1 -> 2: the single-process checkpoint loads into a sharded net
    net3 = idist.shard_(_net(11))
    opt3 = _opt(net3)
    idist.load_checkpoint(folder / "single", net3, opt3)
    _train(net3, opt3, second)
    out["resume_1_to_2"] = _maxdiff(net3(x_test).detach(), ref_out)
    out["manifest_world"] = idist.read_manifest(folder / "sharded")["world_size"]
    return out


def _grid(rank: int, world: int) -> dict:
    """4 processes: 2 data-parallel replicas × 2 shards; the reference is one process on the
    whole batch."""
    import inf.distributed as idist

    shard_group, data_group = idist.process_grid(shards=2)
    replica = rank // 2
    batches = _batches(10, 8, seed=3)
    ref, net = _net(0), _net(0)
    idist.shard_(net, shard_group)
    idist.data_parallel_(net, data_group)
    _train(ref, _opt(ref), batches)
    _train(
        net,
        _opt(net),
        [(x[replica * 4 : (replica + 1) * 4], y[replica * 4 : (replica + 1) * 4]) for x, y in batches],
    )
    x_test = torch.randn(7, 6, generator=torch.Generator().manual_seed(9), dtype=F64)
    with torch.no_grad():
        return {
            "out": _maxdiff(ref(x_test), net(x_test)),
            "rows_local": torch.tensor(net.rows_per_layer()),
            "rows_global": torch.tensor(idist.global_rows_per_layer(net)),
            "rows_ref": torch.tensor(ref.rows_per_layer()),
        }


def _bad_input_on_one_rank(rank: int, world: int) -> dict:
    import inf.distributed as idist

    net = idist.shard_(_net(0))
    x = torch.randn(4, 6, dtype=F64)
    if rank == 1:
        x[0, 0] = float("nan")
    net(x)  # rank 1 raises before the all-reduce; rank 0 waits in it until the job is ended
    return {}


# --------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def sharded_results():
    return run_distributed(_sharded_vs_single)


def test_sharded_training_equals_one_process(sharded_results):
    for rank, res in enumerate(sharded_results):
        for name in ("plain", "layernorm", "tract"):
            r = res[name]
            assert r["init"] < TOL, (rank, name, r)
            assert r["loss"] < TOL, (rank, name, r)
            assert r["out"] < TOL, (rank, name, r)
            # each rank holds its share: balanced counts whose sum is the single-process count
            assert torch.equal(r["rows_global"], r["rows_ref"]), (rank, name, r)
            assert (r["rows_local"] * 2 - r["rows_ref"]).abs().max() <= 1
    total = sharded_results[0]["plain"]["rows_local"] + sharded_results[1]["plain"]["rows_local"]
    assert torch.equal(total, sharded_results[0]["plain"]["rows_ref"])
    for res in sharded_results:
        assert res["temporary_rows"] < TOL and res["temporary_rows_restored"], res
        assert res["sample"] < TOL, res
    assert sharded_results[0]["gathered_rows"] < TOL
    assert sharded_results[0]["gathered_out"] < TOL


def test_data_parallel_equals_one_process_on_the_whole_batch():
    res = run_distributed(_data_parallel)
    for r in res:
        assert r["out"] < TOL, r
        assert torch.equal(r["rows_dp"], r["rows_ref"]), r
        assert "TrAct" in r["tract_refused"] and "shard_" in r["tract_refused"]


def test_checkpoints_reshard_and_resume():
    with tempfile.TemporaryDirectory() as folder:
        res = run_distributed(_checkpoints, folder)
        assert sorted(os.listdir(folder)) == ["sharded", "single"]  # no temporary folders left
    for r in res:
        assert r["extra_step"] == 5
        assert r["sharded_vs_ref"] < TOL, r
        assert r["resume_2_to_2"] == 0.0, r  # same processes, same layout: bit for bit
        assert r["resume_1_to_2"] < TOL, r
        assert r["full_state_2_to_2"] == 0.0, r
        assert r["full_state_2_to_1"] < TOL, r
        assert r["manifest_world"] == 2
    assert res[0]["resume_2_to_1"] < TOL, res[0]


def test_error_on_one_rank_ends_the_job_with_its_message():
    t0 = time.monotonic()
    with pytest.raises(DistributedJobError, match="rank 1 failed first: ValueError: .*NaN or inf"):
        run_distributed(_bad_input_on_one_rank, timeout=60)
    assert time.monotonic() - t0 < 30


@pytest.mark.slow
def test_grid_of_shards_and_data_parallel_replicas_equals_one_process():
    res = run_distributed(_grid, world=4)
    for r in res:
        assert r["out"] < TOL, r
        assert torch.equal(r["rows_global"], r["rows_ref"]), r
    assert torch.equal(res[0]["rows_local"] + res[1]["rows_local"], res[0]["rows_ref"])


def test_checkpoint_folder_in_one_process(tmp_path):
    """Without torch.distributed: a plain net saves and loads, the folder is replaced atomically
    (no temporaries left), and broken folders are refused with one-line errors."""
    import inf.distributed as idist

    net = _net(0)
    opt = _opt(net)
    _train(net, opt, _batches(3, 4))
    idist.save_checkpoint(tmp_path / "ck", net, opt, extra={"epoch": 3})
    idist.save_checkpoint(tmp_path / "ck", net, opt, extra={"epoch": 4})  # replaces the first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        "extra.pt",
        "manifest.json",
        "shard00000-of-00001.pt",
    ]
    other = _net(5)
    other_opt = _opt(other)
    assert idist.load_checkpoint(tmp_path / "ck", other, other_opt) == {"epoch": 4}
    batch = _batches(2, 4, seed=8)
    assert _maxdiff(_train(net, opt, batch), _train(other, other_opt, batch)) == 0.0

    with pytest.raises(idist.CheckpointError, match="not a sharded checkpoint"):
        idist.load_checkpoint(tmp_path, other)
    (tmp_path / "ck" / "shard00000-of-00001.pt").unlink()
    with pytest.raises(idist.CheckpointError, match="incomplete: shard00000-of-00001.pt is missing"):
        idist.load_checkpoint(tmp_path / "ck", other)
    (tmp_path / "ck" / "manifest.json").write_text("{")
    with pytest.raises(idist.CheckpointError, match="corrupt"):
        idist.load_checkpoint(tmp_path / "ck", other)
    assert idist.shard_(other) is other and not idist.is_sharded(other)  # no process group: unchanged


# --------------------------------------------------------------------------- programs under torchrun
def _torchrun(args: list[str], nproc: int = 2, timeout: float = 600) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", GLOO_SOCKET_IFNAME="lo")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        str(nproc),
        *args,
    ]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=Path(__file__).resolve().parents[1]
    )


@pytest.mark.slow
def test_cifar10mlp_under_torchrun_equals_one_process(tmp_path):
    """The paper's program, sharded over 2 processes by torchrun with no other change, trains
    the same net as one process; only process 0 writes; metrics.json says how rows are spread."""
    from experiments.cifar10 import cifar10mlp
    from experiments.data.synthetic import write_synthetic_cifar10

    data = write_synthetic_cifar10(tmp_path / "cifar", n_train=64, n_test=32)
    common = [
        "--data",
        str(data),
        "--float",
        "--r",
        "8",
        "--depth",
        "2",
        "--train-size",
        "64",
        "--test-size",
        "32",
        "--no-progress",
        "--epochs",
        "2",
        "--lr",
        "0.5",
        "--momentum",
        "0.9",
        "--wd",
        "1e-3",
        "--gclip",
        "0.5",
        "--gclip-per-param",
        "--batch-size",
        "8",
        "--save-model",
    ]
    torch.set_num_threads(1)
    single = cifar10mlp.main(common + ["--save-dir", str(tmp_path / "one")])
    run = _torchrun(
        ["-m", "experiments.cifar10.cifar10mlp", "--", *common, "--save-dir", str(tmp_path / "two")]
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("cifar10mlp: 2 epochs, final test accuracy") == 1, run.stdout  # process 0 only
    assert run.stderr.count("epoch 2/2  train loss") == 1, run.stderr  # log lines: process 0 only
    (folder,) = (tmp_path / "two").iterdir()
    doc = json.loads((folder / "metrics.json").read_text())
    assert doc["distributed"]["world_size"] == 2
    for layer in doc["distributed"]["layers"].values():
        assert layer["rows_total"] == 8 + 2 * 64 and layer["rows_per_process"] == [68, 68]
    for a, b in zip(single["epochs"], doc["epochs"]):
        assert a["rows"] == b["rows"] == f"{8 + a['epoch'] * 64}/" * 2 + f"{8 + a['epoch'] * 64}"
        for key in ("train_loss", "test_loss"):  # float32: only the summation order differs
            assert b[key] == pytest.approx(a[key], rel=1e-4), (key, a, b)
    # the checkpoint has the single-process format: it continues in one process
    from experiments.runs import load_checkpoint

    ckpt = load_checkpoint(folder / "checkpoint.pt")
    assert ckpt["model"]["layers.1.rows.A"].shape[0] == 8 + 2 * 64


@pytest.mark.slow
def test_transfer_under_torchrun_equals_one_process(tmp_path):
    """ImageNet pretraining with feature-kernel transfer (every process computes the features,
    which go through the sharded layers) gives the single-process metrics."""
    from experiments.data.synthetic import write_synthetic_cifar10
    from experiments.data.synthetic_imagenet import write_synthetic_imagenet32
    from experiments.imagenet import transfer_imagenet

    cifar = write_synthetic_cifar10(tmp_path / "cifar", n_train=64, n_test=32)
    imagenet = write_synthetic_imagenet32(tmp_path / "imagenet", n_per_batch=32, n_batches=2, num_classes=10)
    common = [
        "--imagenet-data",
        str(imagenet),
        "--cifar-data",
        str(cifar),
        "--r",
        "8",
        "--epochs",
        "2",
        "--float",
        "--lr",
        "0.01",
        "--batch-size",
        "16",
        "--transfer-milestones",
        "0,2",
        "--train-size",
        "64",
        "--no-progress",
    ]
    torch.set_num_threads(1)
    single = transfer_imagenet.main(common + ["--save-dir", str(tmp_path / "one")])
    run = _torchrun(
        ["-m", "experiments.imagenet.transfer_imagenet", "--", *common, "--save-dir", str(tmp_path / "two")]
    )
    assert run.returncode == 0, run.stderr[-3000:]
    (folder,) = (tmp_path / "two").iterdir()
    doc = json.loads((folder / "metrics.json").read_text())
    assert doc["distributed"]["world_size"] == 2
    for a, b in zip(single["epochs"], doc["epochs"]):
        assert a.get("rows") == b.get("rows") and a.get("transfer_acc") == b.get("transfer_acc"), (a, b)
        if a.get("train_loss") is not None:
            assert b["train_loss"] == pytest.approx(a["train_loss"], rel=1e-4)


@pytest.mark.slow
def test_quickstart_under_torchrun(tmp_path):
    run = _torchrun(
        [
            "-m",
            "experiments.quickstart",
            "--",
            "--epochs",
            "1",
            "--r",
            "8",
            "--width",
            "64",
            "--no-progress",
            "--out",
            str(tmp_path / "q.png"),
        ]
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("test accuracy  infinite π-MLP") == 1, run.stdout
    assert (tmp_path / "q.png").exists()


@pytest.mark.slow
def test_program_error_under_torchrun_ends_the_job_with_one_line(tmp_path):
    t0 = time.monotonic()
    run = _torchrun(
        [
            "-m",
            "experiments.cifar10.cifar10mlp",
            "--",
            "--data",
            str(tmp_path / "missing"),
            "--r",
            "8",
            "--epochs",
            "1",
        ]
    )
    assert run.returncode != 0
    assert "cifar10mlp: error:" in run.stderr and str(tmp_path / "missing") in run.stderr
    assert time.monotonic() - t0 < 120
