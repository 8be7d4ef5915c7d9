"""recalibrate on PyTorch models at data-set scale: exact float64 statistics, any iterable
(DataLoader with workers, dicts, forward_fn), the norms it supports, restore on failure, the
undo handle, and two processes with torch.distributed (gloo) merged exactly."""

from __future__ import annotations

import math
import os
import time

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import normfuse  # noqa: E402
from normfuse.torchmodel.layers import FrozenBatchNorm  # noqa: E402
from tests.torch_models import ResNetish, randomize  # noqa: E402


def _x(shape, seed=0, shift=0.7):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1.5 + shift


def _batches(n=5, shape=(6, 3, 12, 12), seed=0, shift=0.7):
    return [_x(shape, seed * 1000 + i, shift) for i in range(n)]


def _captured(model, kinds=None):
    """Hooks that keep every norm's inputs in float64; returns (store, remove)."""
    store: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, kinds or (nn.modules.batchnorm._BatchNorm, FrozenBatchNorm)):
            hooks.append(
                m.register_forward_pre_hook(
                    lambda m, a, name=name: store.setdefault(name, []).append(
                        a[0].detach().double()
                    )
                )
            )
    return store, lambda: [h.remove() for h in hooks]


def _direct(inputs, ddof=1):
    data = torch.cat([t.transpose(0, 1).reshape(t.shape[1], -1) for t in inputs], dim=1)
    return data.mean(1), data.var(1, correction=ddof)


def _rel(a, b):
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / b.abs().max())


def _resnetish():
    torch.manual_seed(0)  # the same conv weights every time, in every process
    return randomize(ResNetish())


def _stats(model):
    return {
        n: (m.running_mean.clone(), m.running_var.clone())
        for n, m in model.named_modules()
        if getattr(m, "running_mean", None) is not None
    }


@pytest.mark.parametrize("estimator", ["unbiased", "population"])
def test_statistics_are_exact_in_float64(estimator):
    model = _resnetish().double()  # float64 buffers: the written values are compared
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_var.mul_(7.0)  # stale statistics, far from the data's
    batches = [b.double() for b in _batches()]
    store, remove = _captured(model)
    report = normfuse.recalibrate(model, batches, estimator=estimator, progress=False)
    remove()
    assert len(report.applied) == 6 and f"{estimator} variance" in report.notes[-1]
    ddof = 1 if estimator == "unbiased" else 0
    worst = 0.0
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            mean, var = _direct(store[name], ddof)
            worst = max(worst, _rel(m.running_mean, mean), _rel(m.running_var, var))
            assert int(m.num_batches_tracked) == 5
    print(f"max relative difference from direct float64 statistics: {worst:.2e}")
    assert worst < 1e-12


def test_the_pass_is_update_bns_and_only_normfuse_is_exact():
    """torch's BatchNorms run their training forward: the inputs are those update_bn's pass
    sees; normfuse's statistics are theirs to float32 rounding, update_bn's are not."""
    import copy

    model = _resnetish()
    twin = copy.deepcopy(model)
    batches = _batches(4, (3, 3, 12, 12))
    twin.train()
    store, remove = _captured(twin)
    with torch.no_grad():
        for x in batches:
            twin(x)
    remove()
    swa = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, swa)
    normfuse.recalibrate(model, batches, progress=False)
    ours = theirs = 0.0
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            mean, var = _direct(store[name])
            ours = max(ours, _rel(m.running_var, var), _rel(m.running_mean, mean))
            theirs = max(theirs, _rel(swa.get_submodule(name).running_var, var))
    print(f"running_var vs exact: normfuse {ours:.1e}, update_bn {theirs:.1e}")
    assert ours < 2e-7 and theirs > 1e-3


def test_dataloader_with_workers_equals_a_list_and_num_samples_cuts_the_last_batch():
    from torch.utils.data import DataLoader, TensorDataset

    images = torch.cat(_batches(4, (5, 3, 12, 12)))
    labels = torch.arange(len(images))
    loader = DataLoader(TensorDataset(images, labels), batch_size=5, num_workers=2)
    a, b, c = (_resnetish() for _ in range(3))
    ra = normfuse.recalibrate(a, loader, progress=False)
    normfuse.recalibrate(b, [(images[i : i + 5], labels[i : i + 5]) for i in range(0, 20, 5)])
    for (ma, va), (mb, vb) in zip(_stats(a).values(), _stats(b).values(), strict=True):
        assert torch.equal(ma, mb) and torch.equal(va, vb)
    assert "4 batch(es), 20 sample(s)" in ra.notes[-1]
    rc = normfuse.recalibrate(c, loader, num_samples=13, progress=False)  # 5 + 5 + 3
    assert "3 batch(es), 13 sample(s)" in rc.notes[-1]
    assert rc.entries[0].target == "statistics over 1872 values per channel"  # 13 * 12 * 12


class _KwargsNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, image, scale=1.0):
        return self.bn(self.conv(image * scale))


def test_dict_batches_and_forward_fn():
    batches = _batches(3)
    torch.manual_seed(0)
    a = randomize(_KwargsNet())
    torch.manual_seed(0)
    b = randomize(_KwargsNet())
    normfuse.recalibrate(a, [{"image": x, "scale": 2.0} for x in batches], progress=False)

    class Sample:  # a batch type normfuse cannot read
        def __init__(self, x):
            self.pixels = x

    normfuse.recalibrate(
        b,
        [Sample(x) for x in batches],
        forward_fn=lambda model, s: model(image=s.pixels, scale=2.0),
        progress=False,
    )
    assert torch.equal(a.bn.running_var, b.bn.running_var)
    with torch.no_grad():
        conv = torch.cat([a.conv(x * 2.0) for x in batches]).double()
    mean, var = _direct([conv])
    assert _rel(a.bn.running_mean, mean) < 1e-6 and _rel(a.bn.running_var, var) < 1e-6
    with pytest.raises(normfuse.InputError, match="forward_fn"):
        normfuse.recalibrate(b, [Sample(batches[0])], progress=False)


def test_dropout_stays_off():
    """With dropout on, the BatchNorm behind it would see scaled, zeroed inputs."""
    model = randomize(nn.Sequential(nn.Linear(6, 8), nn.Dropout(0.5), nn.BatchNorm1d(8)))
    model.train()  # a model left in training mode: dropout must still stay off
    batches = [_x((32, 6), s) for s in range(4)]
    normfuse.recalibrate(model, batches, progress=False)
    assert all(m.training for m in model.modules())  # flags restored
    with torch.no_grad():
        lin = torch.cat([model[0](x) for x in batches]).double()
    mean, var = _direct([lin])
    assert _rel(model[2].running_mean, mean) < 1e-6 and _rel(model[2].running_var, var) < 1e-6


def test_a_failing_batch_restores_everything_and_is_named():
    model = _resnetish()
    model.stem[1].momentum = None
    model.stem[0].weight.requires_grad_(False)
    model.layers.train()
    before = {k: (m.clone(), v.clone()) for k, (m, v) in _stats(model).items()}
    flags = [m.training for m in model.modules()]
    tracked = int(model.stem[1].num_batches_tracked)
    batches = [*_batches(2), _x((2, 5, 12, 12))]  # batch 2 has the wrong channel count
    with pytest.raises(RuntimeError, match="batch 2 failed"):
        normfuse.recalibrate(model, batches, progress=False)
    for k, (m, v) in _stats(model).items():
        assert torch.equal(m, before[k][0]) and torch.equal(v, before[k][1])
    assert [m.training for m in model.modules()] == flags
    assert model.stem[1].momentum is None and model.stem[1].weight.requires_grad
    assert not model.stem[0].weight.requires_grad
    assert int(model.stem[1].num_batches_tracked) == tracked
    assert not model.stem[1]._forward_pre_hooks  # hooks removed


def test_undo_handle_and_context_manager():
    model = _resnetish()
    before = {k: (m.clone(), v.clone()) for k, (m, v) in _stats(model).items()}
    report = normfuse.recalibrate(model, _batches(2), progress=False)
    assert not torch.equal(model.stem[1].running_mean, before["stem.1"][0])
    report.restore()
    for k, (m, v) in _stats(model).items():
        assert torch.equal(m, before[k][0]) and torch.equal(v, before[k][1])
    with normfuse.recalibrate(model, _batches(2), progress=False):
        changed = model.stem[1].running_var.clone()
    assert not torch.equal(changed, before["stem.1"][1])
    assert torch.equal(model.stem[1].running_var, before["stem.1"][1])
    with pytest.raises(ValueError, match="nothing to restore"):
        normfuse.Report(action="fold").restore()


class FrozenBatchNorm2d(nn.Module):
    """torchvision.ops.misc.FrozenBatchNorm2d as written there (four buffers)."""

    def __init__(self, n: int, eps: float = 1e-5) -> None:
        super().__init__()
        self.eps = eps
        self.register_buffer("weight", torch.ones(n))
        self.register_buffer("bias", torch.zeros(n))
        self.register_buffer("running_mean", torch.zeros(n))
        self.register_buffer("running_var", torch.ones(n))

    def forward(self, x):
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        return x * scale + (b - rm * scale)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d: a _BatchNorm subclass whose forward is BN, then drop, then act."""

    def __init__(self, n: int) -> None:
        super().__init__(n)
        self.drop = nn.Dropout(0.5)
        self.act = nn.ReLU()

    def forward(self, x):
        bn_training = self.training or self.running_mean is None
        x = nn.functional.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            0.0 if self.momentum is None else self.momentum,
            self.eps,
        )
        return self.act(self.drop(x))


class Shifted(nn.BatchNorm2d):
    """Looks like a BatchNorm but normalises with something else: refused."""

    def forward(self, x):
        return nn.functional.batch_norm(
            x, self.running_mean + 1, self.running_var, self.weight, self.bias, False, 0.1, self.eps
        )


def test_syncbn_frozen_batchnormact_and_a_norm_called_twice():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c1, self.n1 = nn.Conv2d(3, 4, 3), nn.SyncBatchNorm(4)
            self.c2, self.n2 = nn.Conv2d(4, 4, 3), FrozenBatchNorm(4)
            self.c3, self.n3 = nn.Conv2d(4, 4, 3), FrozenBatchNorm2d(4)
            self.c4, self.n4 = nn.Conv2d(4, 4, 3), BatchNormAct2d(4)
            self.c5, self.shared = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
            self.n6 = Shifted(4)

        def forward(self, x):
            x = self.n4(self.c4(self.n3(self.c3(self.n2(self.c2(self.n1(self.c1(x))))))))
            y = self.shared(self.c5(x))
            return self.n6(self.shared(y * 3 + 1))  # self.shared called twice

    model = randomize(Net())
    model.n4.train()  # in training mode with its drop child: the drop must still stay off
    seen = []
    model.n4.drop.register_forward_hook(lambda m, a, o: seen.append(m.training))
    store, remove = _captured(model, (nn.Module,))
    report = normfuse.recalibrate(model, _batches(3), progress=False)
    remove()
    assert seen == [False] * 3 and model.n4.drop.training and model.n4.training
    status = {e.node: e for e in report.entries}
    assert {k for k, e in status.items() if e.status == "applied"} == {
        "n1",
        "n2",
        "n3",
        "n4",
        "shared",
    }
    assert "normalise with" in status["n6"].reason and status["n6"].status == "skipped"
    assert "called 2 times per batch: inputs pooled" in status["shared"].target
    worst = 0.0
    for name in ("n1", "n2", "n3", "n4", "shared"):
        m = getattr(model, name)
        mean, var = _direct(store[name])  # both calls' inputs of 'shared' together
        worst = max(worst, _rel(m.running_mean, mean), _rel(m.running_var, var))
    assert worst < 1e-6  # float32 buffers


def test_timm_batchnormact2d_when_available():
    from tests.timm_shim import import_timm

    timm = import_timm()
    if timm is None:
        pytest.skip("timm does not import here")
    from timm.layers import BatchNormAct2d as TimmBNAct

    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), TimmBNAct(4, drop_layer=nn.Dropout)))
    store, remove = _captured(model)
    report = normfuse.recalibrate(model, _batches(3), progress=False)
    remove()
    assert report.applied[0].node == "1"
    mean, var = _direct(store["1"])
    assert _rel(model[1].running_mean, mean) < 1e-6 and _rel(model[1].running_var, var) < 1e-6


def test_torch_compile_wrapper_is_unwrapped():
    model, twin = _resnetish(), _resnetish()
    compiled = torch.compile(model)
    report = normfuse.recalibrate(compiled, _batches(2), progress=False)
    normfuse.recalibrate(twin, _batches(2), progress=False)
    assert "torch.compile" in report.notes[0]
    assert torch.equal(model.stem[1].running_var, twin.stem[1].running_var)


# ---------------------------------------------------------------- two processes (gloo)

SHIFTS = (2.0, -1.0)  # the shards' means differ: per-rank averaging misses the spread


def _shard(rank):
    return [b.double() for b in _batches(3, (4, 3, 12, 12), seed=rank + 1, shift=SHIFTS[rank])]


def _net(sync=True):
    """ResNetish in float64 (so that 1e-12 can be seen), with one SyncBatchNorm."""
    model = _resnetish()
    if sync:  # in training it would sync per batch (GPU only); the pass keeps it in eval
        model.stem[1] = nn.SyncBatchNorm(8)
    return randomize(model).double()


def _worker(rank, world, init, out):
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    try:
        model = _net()
        report = normfuse.recalibrate(model, _shard(rank), progress=False)
        plain = _net(sync=False)  # inside DDP (which takes no SyncBatchNorm on CPU)
        normfuse.recalibrate(nn.parallel.DistributedDataParallel(plain), _shard(rank))
        local = _net()  # this rank's statistics alone, then averaged (timm)
        normfuse.recalibrate(local, _shard(rank), progress=False, distributed=False)
        for m in local.modules():
            if getattr(m, "running_var", None) is not None:
                dist.all_reduce(m.running_mean)
                dist.all_reduce(m.running_var)
                m.running_mean /= world
                m.running_var /= world
        torch.save(
            {
                "exact": _stats(model),
                "ddp": _stats(plain),
                "averaged": _stats(local),
                "notes": report.notes,
            },
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


def test_two_processes_equal_one_process_over_the_union(tmp_path):
    import torch.multiprocessing as mp

    start = time.perf_counter()
    init = f"file://{tmp_path / 'rendezvous'}"
    mp.spawn(_worker, args=(2, init, str(tmp_path)), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    one = _net()
    normfuse.recalibrate(one, _shard(0) + _shard(1), progress=False)
    single = _stats(one)
    worst = averaged = 0.0
    for name, (mean, var) in single.items():
        for r in ranks:  # every rank ends with the same statistics, bit for bit
            assert torch.equal(r["exact"][name][0], ranks[0]["exact"][name][0])
            assert torch.equal(r["exact"][name][1], ranks[0]["exact"][name][1])
            assert _rel(r["ddp"][name][1], var) < 1e-12  # stem BatchNorm2d in training mode
        got_mean, got_var = ranks[0]["exact"][name]
        worst = max(worst, _rel(got_mean, mean), _rel(got_var, var))
        avg_var = ranks[0]["averaged"][name][1]
        averaged = max(averaged, _rel(avg_var, var))
    assert "merged exactly over 2 processes" in ranks[0]["notes"][-2]
    assert "6 batch(es), 24 sample(s)" in ranks[0]["notes"][-1]
    print(
        f"2 processes vs 1 over the union: max relative difference {worst:.2e}; "
        f"per-rank averaging (PreciseBN/timm distribute_bn): {averaged:.2e} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    assert worst < 1e-12 and averaged > 1e-2
    assert math.isfinite(averaged)


def test_bad_arguments_are_user_errors():
    model = _resnetish()
    with pytest.raises(normfuse.InputError, match="not initialised"):
        normfuse.recalibrate(model, _batches(1), distributed=True, progress=False)
    with pytest.raises(normfuse.InputError, match="estimator"):
        normfuse.recalibrate(model, _batches(1), estimator="sample", progress=False)
    with pytest.raises(normfuse.InputError, match="no batches"):
        normfuse.recalibrate(model, [], progress=False)
    with pytest.raises(normfuse.InputError, match="num_samples"):
        normfuse.recalibrate(model, _batches(1), num_samples=0, progress=False)


# ---------------------------------------------------------------- ONNX, one pass (batch mode)


def test_onnx_batch_mode_agrees_with_the_pytorch_recalibration(tmp_path):
    """--mode batch: each BatchNormalization normalises with the batch's own statistics during
    the single pass, as PyTorch's BatchNorm in training: the same statistics as PyTorch's."""
    import io

    import numpy as np
    import onnx
    from click.testing import CliRunner

    from normfuse.cli import cli

    model = _resnetish()
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (torch.randn(2, 3, 12, 12),),
        buf,
        dynamo=False,
        training=torch.onnx.TrainingMode.PRESERVE,
        do_constant_folding=False,
        input_names=["x"],
        dynamic_axes={"x": {0: "n"}},
    )
    path = tmp_path / "m.onnx"
    onnx.save(onnx.shape_inference.infer_shapes(onnx.load_from_string(buf.getvalue())), path)
    batches = _batches(4, (6, 3, 12, 12))
    data = tmp_path / "data"
    data.mkdir()
    for i, b in enumerate(batches):
        np.savez(data / f"{i:03d}.npz", x=b.numpy())
    new, report = normfuse.recalibrate(str(path), [{"x": b.numpy()} for b in batches], mode="batch")
    assert len(report.applied) == 6
    normfuse.recalibrate(model, batches, estimator="population", progress=False)
    nodes = [n for n in new.graph.all_nodes() if n.op_type == "BatchNormalization"]
    torch_bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    worst = 0.0
    for node, bn in zip(nodes, torch_bns, strict=True):
        for k, ref in ((3, bn.running_mean), (4, bn.running_var)):
            got = torch.from_numpy(np.asarray(node.inputs[k].const_value.numpy()))
            worst = max(worst, _rel(got, ref))
    print(f"ONNX batch mode vs PyTorch recalibration: max relative difference {worst:.1e}")
    assert worst < 1e-5
    out = tmp_path / "r.onnx"
    args = ["recalibrate", str(path), "--data", str(data), "--mode", "batch", "-o", str(out)]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "6 recalibrated" in result.output
    written = onnx.load(out)
    by_name = {t.name: onnx.numpy_helper.to_array(t) for t in written.graph.initializer}
    first = nodes[0]
    first_bn = next(n for n in written.graph.node if n.op_type == "BatchNormalization")
    cli_var = by_name[first_bn.input[4]]
    assert np.allclose(cli_var, first.inputs[4].const_value.numpy(), rtol=1e-6)
