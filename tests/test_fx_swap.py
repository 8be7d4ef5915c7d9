"""swap, insert and recalibrate on PyTorch models, and the table of norm kinds."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
from torch import nn  # noqa: E402

import normfuse  # noqa: E402
from normfuse.core import norms  # noqa: E402
from normfuse.torchmodel.layers import ChannelLayerNorm, FrozenBatchNorm  # noqa: E402
from tests.torch_models import BNMLP, ResNetish, count_bn, max_rel, randomize  # noqa: E402

IMAGE = (2, 3, 16, 16)


def _x(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3


def test_lookup_normalises_names_and_lists_known_ones():
    assert norms.lookup("GroupNorm").name == norms.lookup("group_norm").name == "groupnorm"
    assert norms.lookup("FrozenBatchNorm2d").name == "frozen"
    with pytest.raises(normfuse.InputError, match="groupnorm"):
        norms.lookup("weightnorm")


@pytest.mark.parametrize(
    ("c", "g"), [(256, 32), (64, 16), (24, 6), (48, 12), (3, 1), (7, 1), (128, 32)]
)
def test_auto_groups(c, g):
    assert norms.auto_groups(c) == g
    assert c % g == 0 and (c // g >= norms.MIN_CHANNELS_PER_GROUP or g == 1)


@pytest.mark.parametrize("to", ["frozen", "syncbn"])
def test_exact_swaps_keep_outputs_identical_in_eval(to):
    model = randomize(ResNetish())
    x = _x(IMAGE)
    swapped, report = normfuse.swap(model, to)
    assert all(e.exact for e in report.entries) and len(report.applied) == 6
    with torch.no_grad():
        assert torch.equal(swapped(x), model(x))


class MyBN(nn.BatchNorm2d):
    """A user's subclass with an attribute of its own."""

    def __init__(self, c: int) -> None:
        super().__init__(c)
        self.tag = "mine"


def test_syncbn_round_trip_restores_the_subclass_and_statistics():
    """SyncBatchNorm.convert_sync_batchnorm loses subclasses (pytorch #187298), has no way back (#41081)."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), MyBN(4)))
    model[1].num_batches_tracked.fill_(17)
    x = _x(IMAGE)
    sync, _ = normfuse.swap(model, "syncbn")
    assert isinstance(sync[1], nn.SyncBatchNorm)
    back, report = normfuse.swap(sync, "batchnorm")
    assert type(back[1]) is MyBN and back[1].tag == "mine"
    assert int(back[1].num_batches_tracked) == 17
    assert torch.equal(back[1].running_var, model[1].running_var)
    assert report.entries[0].exact
    with torch.no_grad():
        assert torch.equal(back(x), model(x))


def test_frozen_back_to_batchnorm_and_state_dict_compatibility():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    frozen, _ = normfuse.swap(model, "frozen")
    fresh = nn.Sequential(nn.Conv2d(3, 4, 3), FrozenBatchNorm(4))
    fresh.load_state_dict(model.state_dict())  # a BatchNorm state dict loads into it
    x = _x(IMAGE)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))
    frozen.train()
    with torch.no_grad():
        assert torch.equal(frozen(x), model.eval()(x))  # frozen even in training mode
    back, _ = normfuse.swap(frozen, "batchnorm")
    assert isinstance(back[1], nn.BatchNorm2d)
    with torch.no_grad():
        assert torch.equal(back.eval()(x), model(x))


def test_groupnorm_trains_with_batch_size_one_where_batchnorm_raises():
    model = randomize(BNMLP(hidden=32))
    x, y = _x((1, 12)), torch.tensor([2])
    model.train()
    with pytest.raises(ValueError, match="more than 1 value"):
        model(x)
    gn, report = normfuse.swap(model, "groupnorm", where=lambda name, m: name != "bn0")
    assert {e.node: e.status for e in report.entries} == {"bn1": "applied", "bn2": "applied"}
    assert all(e.exact is False for e in report.entries)
    assert any("change the function" in n for n in report.notes)
    assert isinstance(gn.bn1, nn.GroupNorm) and gn.bn1.num_groups == 8
    assert torch.equal(gn.bn1.weight, model.bn1.weight) and gn.bn1.eps == model.bn1.eps
    gn.bn0.eval()  # the input BN stays a BatchNorm; its statistics are used
    gn.train()
    gn.bn0.eval()
    opt = torch.optim.SGD(gn.parameters(), lr=0.1)
    before = gn.fc1.weight.detach().clone()
    loss = nn.functional.cross_entropy(gn(x), y)
    loss.backward()
    opt.step()
    assert torch.isfinite(loss) and not torch.equal(gn.fc1.weight, before)


def test_groupnorm_refuses_single_channel_groups_on_1d_data_unless_asked():
    """Opacus's GN(4, 4) on (N, C) data wipes the signal (opacus #567)."""
    model = randomize(nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4)))
    _, report = normfuse.swap(model, "groupnorm", groups=4)
    assert report.entries[0].status == "skipped" and "1 channel" in report.entries[0].reason
    _, report = normfuse.swap(model, "groupnorm", groups=3)
    assert "do not split" in report.entries[0].reason
    swapped, report = normfuse.swap(model, "groupnorm", groups=4, allow_single_channel_groups=True)
    assert report.entries[0].status == "applied" and swapped[1].num_groups == 4


def test_swap_carries_dtype_device_requires_grad_and_training_flag():
    model = randomize(ResNetish()).double()
    model.stem[1].weight.requires_grad_(False)
    model.layers.train()
    for to, cls in [
        ("groupnorm", nn.GroupNorm),
        ("layernorm", ChannelLayerNorm),
        ("instancenorm", nn.InstanceNorm2d),
    ]:
        swapped, _ = normfuse.swap(model, to)
        new = swapped.stem[1]
        assert isinstance(new, cls)
        assert (
            new.weight.dtype == torch.float64 and new.weight.device == model.stem[1].weight.device
        )
        assert not new.weight.requires_grad and new.bias.requires_grad
        assert torch.equal(new.bias, model.stem[1].bias)
        assert not new.training and swapped.layers[0].bn1.training
        with torch.no_grad():
            out = swapped.eval()(_x(IMAGE).double())
        assert out.dtype == torch.float64 and torch.isfinite(out).all()


def test_layernorm_over_channels_matches_a_reference():
    model = randomize(nn.Sequential(nn.BatchNorm2d(6)))
    ln, _ = normfuse.swap(model, "layernorm")
    x = _x((2, 6, 5, 5))
    with torch.no_grad():
        ref = nn.functional.layer_norm(
            x.permute(0, 2, 3, 1), (6,), model[0].weight, model[0].bias, model[0].eps
        )
        assert max_rel(ln(x), ref.permute(0, 3, 1, 2)) <= 1e-6


def test_where_by_type_glob_and_identity():
    model = randomize(ResNetish())
    _, report = normfuse.swap(model, "identity", where="layers.1.*")
    assert {e.node for e in report.entries} == {"layers.1.bn1", "layers.1.bn2", "layers.1.down.1"}
    swapped, report = normfuse.swap(model, "identity", where=nn.BatchNorm2d)
    assert count_bn(swapped) == 0 and len(report.applied) == 6
    with pytest.raises(normfuse.InputError):
        normfuse.swap(model, "identity", where=3)


def test_swap_without_statistics_to_frozen_is_skipped():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False))
    _, report = normfuse.swap(model, "frozen")
    assert "track_running_stats=False" in report.entries[0].reason


def test_swap_of_something_that_is_no_model_is_an_input_error():
    with pytest.raises(normfuse.InputError):
        normfuse.swap(b"neither a module nor an ONNX model", "groupnorm")


# ------------------------------------------------------------------------------------ insert


class PlainMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(12, 32), nn.Linear(32, 32), nn.Linear(32, 5)

    def forward(self, x):
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.head(x)


def test_insert_builds_the_classic_bn_mlp_at_identity():
    model = PlainMLP().eval()
    x = _x((6, 12))
    new, report = normfuse.insert(model, x, input_norm=True)
    by = {e.node: e for e in report.entries}
    assert by["fc1"].status == by["fc2"].status == by["fc1 input"].status == "applied"
    assert by["head"].status == "skipped" and "model output" in by["head"].reason
    assert list(new.fc1) == [new.fc1.norm0, new.fc1.op, new.fc1.norm]
    assert isinstance(new.fc2.norm, nn.BatchNorm1d) and new.fc2.norm.num_features == 32
    with torch.no_grad():
        assert max_rel(new(x), model(x)) <= 1e-6  # identity in eval
    folded, _ = normfuse.fold(new, example_inputs=x)  # and the new norms fold away again
    assert count_bn(folded) == 0


def test_insert_skips_ops_already_followed_by_a_norm_and_handles_convs():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Conv2d(4, 4, 3),
        nn.ReLU(),
        nn.Conv2d(4, 2, 1),
    ).eval()
    x = _x(IMAGE)
    new, report = normfuse.insert(model, x)
    by = {e.node: e for e in report.entries}
    assert "already followed" in by["0"].reason
    assert by["3"].status == "applied" and isinstance(new[3].norm, nn.BatchNorm2d)
    with torch.no_grad():
        assert max_rel(new(x), model(x)) <= 1e-6


def test_insert_groupnorm_is_reported_as_changing_the_function():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 2, 1)).eval()
    _, report = normfuse.insert(model, _x(IMAGE), norm="groupnorm")
    assert report.entries[0].exact is False and report.entries[0].warnings


def test_insert_refuses_batchnorm_after_a_linear_on_sequences():
    model = nn.Sequential(nn.Linear(6, 6), nn.ReLU(), nn.Linear(6, 2)).eval()
    _, report = normfuse.insert(model, _x((2, 5, 6)))
    assert "rank 3" in report.entries[0].reason
    new, report = normfuse.insert(model, _x((2, 5, 6)), norm="layernorm")
    assert report.entries[0].status == "applied"
    assert isinstance(new[0].norm, ChannelLayerNorm) is False and isinstance(
        new[0].norm, nn.LayerNorm
    )


# ------------------------------------------------------------------------------- recalibrate


def _batches(n=6, shape=(8, 3, 16, 16), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen) * 1.5 + 0.7 for _ in range(n)]


def test_recalibrate_matches_statistics_computed_directly():
    model = randomize(ResNetish())
    model.layers[0].bn1.running_var.fill_(50.0)  # stale statistics
    batches = _batches()
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, m in model.named_modules():
        if isinstance(m, nn.BatchNorm2d):
            hooks.append(
                m.register_forward_pre_hook(
                    lambda m, a, name=name: captured.setdefault(name, []).append(
                        a[0].detach().double()
                    )
                )
            )
    report = normfuse.recalibrate(model, batches, progress=False)
    for h in hooks:
        h.remove()
    assert len(report.applied) == 6 and not model.training
    for name, m in model.named_modules():
        if not isinstance(m, nn.BatchNorm2d):
            continue
        data = torch.cat(captured[name]).transpose(0, 1).reshape(m.num_features, -1)
        mean, var = data.mean(1), data.var(1, unbiased=True)
        assert (
            float(((m.running_mean.double() - mean).abs() / mean.abs().clamp_min(1e-3)).max())
            < 1e-3
        )
        assert float(((m.running_var.double() - var).abs() / var).max()) < 1e-3
    # the first BN sees plain conv outputs: compare with numpy statistics of those
    import numpy as np

    with torch.no_grad():
        conv_out = np.concatenate([model.stem[0](b).numpy() for b in batches]).astype(np.float64)
    ref_var = conv_out.transpose(1, 0, 2, 3).reshape(8, -1).var(axis=1, ddof=1)
    np.testing.assert_allclose(model.stem[1].running_var.numpy(), ref_var, rtol=1e-4)


def test_recalibrate_restores_flags_counts_batches_and_keeps_dropout_off():
    model = nn.Sequential(
        nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.9), nn.Linear(8, 8), nn.BatchNorm1d(8)
    )
    model.eval()
    model[4].train()
    seen = []
    model[2].register_forward_hook(lambda m, a, o: seen.append(m.training))
    report = normfuse.recalibrate(
        model,
        [(_x((16, 4), s), torch.zeros(16, dtype=torch.long)) for s in range(10)],
        num_batches=4,
        progress=False,
    )
    assert seen == [False] * 4
    assert [m.training for m in model] == [False, False, False, False, True]
    assert int(model[1].num_batches_tracked) == 4
    assert model[1].momentum == 0.1
    assert "4 batch" in report.notes[0]


def test_recalibrate_after_swap_and_pruning():
    from torch.nn.utils import prune

    model = randomize(ResNetish())
    model, _ = normfuse.swap(model, "frozen", where="layers.1.*")
    prune.l1_unstructured(model.stem[0], "weight", amount=0.5)
    report = normfuse.recalibrate(model, _batches(3), progress=False)
    assert len(report.applied) == 6  # three BatchNorm2d and three FrozenBatchNorm
    batch = _batches(1, seed=9)[0]
    with torch.no_grad():
        assert torch.isfinite(model(batch)).all()


def test_recalibrate_leaves_statistics_unchanged_when_a_batch_fails():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    before = model[1].running_mean.clone()
    with pytest.raises(RuntimeError):
        normfuse.recalibrate(model, [_x(IMAGE), _x((2, 5, 16, 16))], progress=False)
    assert torch.equal(model[1].running_mean, before) and not model.training


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor:UserWarning")
def test_recalibrate_after_dynamic_quantization():
    model = randomize(BNMLP())
    quantized = torch.ao.quantization.quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert type(quantized.fc1) is not nn.Linear  # the Linear layers are quantized now
    batches = [_x((16, 12), s) for s in range(4)]
    inputs = []
    hook = quantized.bn1.register_forward_pre_hook(lambda m, a: inputs.append(a[0].double()))
    report = normfuse.recalibrate(quantized, batches, progress=False)
    hook.remove()
    assert len(report.applied) == 3
    data = torch.cat(inputs)
    assert torch.allclose(quantized.bn1.running_mean.double(), data.mean(0), rtol=1e-4, atol=1e-5)
    assert torch.allclose(quantized.bn1.running_var.double(), data.var(0), rtol=1e-4)


def test_a_hooked_batchnorm_is_not_swapped():
    """A forward hook on a BatchNorm would not move to the module that replaces it: even the
    exact frozen swap would then change the output."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).eval()
    model[1].running_var.uniform_(0.5, 2)
    model[1].register_forward_hook(lambda m, i, o: o * 2 + 1)
    x = torch.randn(2, 3, 8, 8)
    swapped, report = normfuse.swap(model, "frozen")
    assert not report.applied and "hooks" in report.skipped[0].reason
    with torch.no_grad():
        assert torch.equal(swapped(x), model(x))


def test_instancenorm_needs_a_batchnorm1d_to_see_positions():
    """BatchNorm1d on (N, C) data: the InstanceNorm1d it became raised on the first call (the
    swap said so in a warning and applied it). Refused there, with the fix; on (N, C, L) data,
    shown by example_inputs, it is applied; without them the rank is unknown: refused."""
    mlp = nn.Sequential(nn.Linear(8, 10), nn.BatchNorm1d(10), nn.ReLU(), nn.Linear(10, 3)).eval()
    x = torch.randn(4, 8)
    swapped, report = normfuse.swap(mlp, to="instancenorm", example_inputs=(x,))
    (entry,) = report.entries
    assert entry.status == "skipped" and "sees rank 2 data" in entry.reason
    assert "groupnorm or layernorm" in entry.fix
    swapped(x)  # still runs
    conv = nn.Sequential(nn.Conv1d(3, 6, 3), nn.BatchNorm1d(6)).eval()
    seq = torch.randn(2, 3, 9)
    swapped, report = normfuse.swap(conv, to="instancenorm", example_inputs=(seq,))
    assert [e.status for e in report.entries] == ["applied"]
    assert isinstance(swapped[1], nn.InstanceNorm1d) and swapped(seq).shape == (2, 6, 7)
    _, report = normfuse.swap(conv, to="instancenorm")
    assert "unknown" in report.entries[0].reason and "example_inputs" in report.entries[0].fix
