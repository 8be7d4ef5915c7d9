"""Folding BatchNorm in PyTorch models: nn.Module, torch.fx.GraphModule, ExportedProgram."""

from __future__ import annotations

import copy

import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import fx, nn  # noqa: E402

import normfuse  # noqa: E402
from normfuse.core.errors import StrictError  # noqa: E402
from normfuse.torchmodel.fold import fold_torch  # noqa: E402
from normfuse.torchmodel.layers import FrozenBatchNorm  # noqa: E402
from tests.torch_models import (  # noqa: E402
    BNMLP,
    Conv3dNet,
    MobileNetish,
    ResNetish,
    UNetish,
    count_bn,
    max_rel,
    randomize,
)

IMAGE = (2, 3, 16, 16)


def _x(shape, seed=0):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2 + 0.3


@pytest.mark.parametrize(
    ("cls", "shape"),
    [(ResNetish, IMAGE), (MobileNetish, IMAGE), (UNetish, IMAGE), (BNMLP, (6, 12))],
)
def test_every_bn_folds_and_outputs_match(cls, shape):
    model = randomize(cls())
    x = _x(shape)
    before = count_bn(model)
    folded, report = normfuse.fold(model, example_inputs=x)
    assert before > 0
    assert count_bn(folded) == 0
    assert len(report.applied) == before and not report.skipped
    assert type(folded) is cls  # the user's class survives
    assert count_bn(model) == before  # the input is untouched
    with torch.no_grad():
        assert max_rel(folded(x), model(x)) <= 1e-5
        x2 = _x(shape, seed=7)
        assert max_rel(folded(x2), model(x2)) <= 1e-5
    assert report.parity is not None and report.parity.passed


def test_bn_mlp_input_bn_folds_into_the_following_linear():
    model = randomize(BNMLP())
    folded, report = normfuse.fold(model, example_inputs=_x((4, 12)))
    entry = next(e for e in report.entries if e.node == "bn0")
    assert entry.status == "applied" and entry.direction == "before" and "fc1" in entry.target
    assert isinstance(folded.bn0, nn.Identity)


def test_conv1d_convtranspose1d_conv3d_and_two_inputs():
    model = randomize(Conv3dNet())
    x, v = _x((2, 4, 10)), _x((2, 2, 5, 5, 5), 1)
    folded, report = normfuse.fold(model, example_inputs=(x, v))
    assert count_bn(folded) == 0, [(e.node, e.reason) for e in report.skipped]
    with torch.no_grad():
        for a, b in zip(folded(x, v), model(x, v), strict=True):
            assert max_rel(a, b) <= 1e-5


def test_grouped_and_depthwise_conv_transpose():
    """torch.nn.utils.fusion raises or mis-shapes here (pytorch #180995)."""
    for groups, cin, cout in [(4, 8, 12), (8, 8, 8)]:
        model = randomize(
            nn.Sequential(
                nn.ConvTranspose2d(cin, cout, 3, 2, 1, groups=groups), nn.BatchNorm2d(cout)
            )
        )
        x = _x((2, cin, 5, 5))
        folded, _ = normfuse.fold(model, example_inputs=x)
        assert isinstance(folded[1], nn.Identity)
        with torch.no_grad():
            assert max_rel(folded(x), model(x)) <= 1e-5


class TwiceCalled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x)) + self.conv(x * 0.5)


def test_conv_called_twice_is_skipped_in_a_module_with_the_reason():
    """torch.fx.experimental.optimization.fuse folds it anyway (pytorch #104593)."""
    model = randomize(TwiceCalled())
    x = _x(IMAGE)
    folded, report = normfuse.fold(model, example_inputs=x)
    (entry,) = report.entries
    assert entry.status == "skipped" and "also called" in entry.reason
    assert "symbolic_trace" in entry.fix
    with torch.no_grad():
        assert max_rel(folded(x), model(x)) <= 1e-6


def test_conv_called_twice_is_cloned_in_a_graph_module():
    model = randomize(TwiceCalled())
    x = _x(IMAGE)
    gm = fx.symbolic_trace(model)
    folded, report = normfuse.fold(gm, example_inputs=x)
    (entry,) = report.entries
    assert entry.status == "applied" and "copy" in entry.warnings[0]
    assert isinstance(folded, fx.GraphModule)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.Conv2d) for m in folded.modules()) == 2
    with torch.no_grad():
        assert max_rel(folded(x), model(x)) <= 1e-5


class SiameseSameBN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(a)) - self.bn(self.conv(b))


def test_module_called_twice_with_the_same_bn_folds_once():
    model = randomize(SiameseSameBN())
    a, b = _x(IMAGE), _x(IMAGE, 3)
    folded, report = normfuse.fold(model, example_inputs=(a, b))
    assert [e.status for e in report.entries] == ["applied", "applied"]
    assert isinstance(folded.bn, nn.Identity)
    with torch.no_grad():
        assert max_rel(folded(a, b), model(a, b)) <= 1e-5  # folded once, not twice


class Functional(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 5, 3, bias=False)
        self.register_buffer("mean", torch.randn(5))
        self.register_buffer("var", torch.rand(5) + 0.3)
        self.gamma = nn.Parameter(torch.randn(5))
        self.beta = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.batch_norm(
            self.conv(x), self.mean, self.var, self.gamma, self.beta, False, 0.1, 1e-3
        )


def test_functional_batch_norm_folds_in_a_graph_module_and_is_reported_in_a_module():
    model = Functional().eval()
    x = _x(IMAGE)
    _, report = normfuse.fold(model, example_inputs=x)
    assert report.entries[0].status == "skipped" and "functional" in report.entries[0].reason
    gm, report = normfuse.fold(fx.symbolic_trace(model), example_inputs=x)
    assert report.entries[0].status == "applied"
    assert "batch_norm" not in gm.code
    with torch.no_grad():
        assert max_rel(gm(x), model(x)) <= 1e-5


def test_exported_program_folds_and_stays_dynamic():
    model = randomize(ResNetish())
    x = _x(IMAGE)
    ep = torch.export.export(model, (x,), dynamic_shapes=({0: torch.export.Dim("batch", max=64)},))
    folded, report = normfuse.fold(ep)
    assert isinstance(folded, torch.export.ExportedProgram)
    assert report.before.batchnorm_nodes == count_bn(model) == 6
    assert report.after.batchnorm_nodes == 0
    assert not any("batch_norm" in str(n.target) for n in folded.graph.nodes)
    assert not any("running_mean" in k for k in folded.state_dict)
    x5 = _x((5, 3, 16, 16), 2)  # another batch size: the dynamic dimension survived
    with torch.no_grad():
        assert max_rel(folded.module()(x5), model(x5)) <= 1e-5
    assert report.parity is not None and report.parity.passed


def test_a_decomposed_exported_program_folds_as_the_plain_one():
    """``ep.run_decompositions()`` (the core-ATen IR inference back ends take) writes every conv
    and transposed conv as ``aten.convolution``: the same BNs fold, exactly."""
    model = randomize(
        nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1, bias=False),
            nn.BatchNorm2d(6),
            nn.ReLU(),
            nn.ConvTranspose2d(6, 4, 2, stride=2),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 5, 1),
        )
    )
    x = _x(IMAGE)
    ep = torch.export.export(model, (x,))
    _, plain_report = normfuse.fold(ep)
    folded, report = normfuse.fold(ep.run_decompositions())  # checked against the original
    assert report.parity is not None and report.parity.passed
    assert len(report.applied) == len(plain_report.applied) == 3
    assert not any("batch_norm" in str(n.target) for n in folded.graph.nodes)
    with torch.no_grad():
        assert max_rel(folded.module()(x), model(x)) <= 1e-5


@pytest.mark.parametrize("hooked", [False, True])
def test_a_batchnorm_folds_across_an_eval_dropout_into_the_linear_after(hooked):
    """timm's BNLinear head (efficientvit): ``BatchNorm1d -> Dropout -> Linear``. The eval
    dropout returns its input and nothing else reads it: the norm folds into the Linear on every
    path (the module path refused it). A dropout with a forward hook stays, as its hook would
    see other values."""
    model = randomize(nn.Sequential(nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Linear(8, 3)))
    if hooked:
        model[1].register_forward_hook(lambda m, i, o: None)
    x = _x((4, 8))
    for form in (model, torch.fx.symbolic_trace(model)):
        folded, report = fold_torch(form, example_inputs=x)  # checked
        entry = next(e for e in report.entries if e.node == "0")
        assert entry.status == ("skipped" if hooked else "applied"), entry
        with torch.no_grad():
            assert max_rel(folded(x), model(x)) <= 1e-6


class _MixedConv(nn.Module):
    """timm MixNet's MixedConv2d: split the channels, a conv of each kernel size, concatenate,
    then one BatchNorm (``shared``: conv ``a`` is called a second time elsewhere)."""

    def __init__(self, shared: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(2, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 6, 5, padding=2, bias=False)
        self.bn = nn.BatchNorm2d(10)
        self.shared = shared

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x0, x1 = torch.split(x, [2, 4], 1)
        y = F.relu(self.bn(torch.cat([self.a(x0), self.b(x1)], 1)))
        return y + self.a(x0).mean() if self.shared else y


@pytest.mark.parametrize("shared", [False, True])
def test_a_batchnorm_after_a_channel_concat_of_convs_splits_into_them(shared):
    """Each conv takes its channels of the norm's affine, on every path (mixnet_s: 49 of 49 BN
    fold, 34 stayed); a conv called elsewhere too keeps the norm, with the reason."""
    model = randomize(_MixedConv(shared)).eval()
    x = _x((2, 6, 8, 8))
    forms = [model, torch.fx.symbolic_trace(model), torch.export.export(model, (x,))]
    for form in forms:
        inputs = None if isinstance(form, torch.export.ExportedProgram) else x
        folded, report = fold_torch(form, example_inputs=inputs)  # checked
        entry = next(e for e in report.entries if e.node == "bn")
        if shared:
            assert entry.status == "skipped" and "also called elsewhere" in entry.reason
            continue
        assert entry.status == "applied" and "each its channels of cat" in entry.target, entry
        run = folded.module() if isinstance(folded, torch.export.ExportedProgram) else folded
        with torch.no_grad():
            assert max_rel(run(x), model(x)) <= 1e-6
        assert count_bn(run) == 0


def test_training_mode_and_batch_statistics_are_skipped_with_reasons():
    model = randomize(
        nn.Sequential(
            nn.Conv2d(3, 4, 1),
            nn.BatchNorm2d(4),
            nn.Conv2d(4, 4, 1),
            nn.BatchNorm2d(4, track_running_stats=False),
        )
    )
    model[1].train()
    folded, report = normfuse.fold(model, check=False)
    reasons = {e.node: e.reason for e in report.skipped}
    assert "training mode" in reasons["1"] and "track_running_stats=False" in reasons["3"]
    assert count_bn(folded) == 2


def test_conv_output_used_elsewhere_is_skipped():
    class Branch(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv, self.bn = nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)

        def forward(self, x):
            y = self.conv(x)
            return self.bn(y) * torch.sigmoid(y)

    model = randomize(Branch())
    _, report = normfuse.fold(model, example_inputs=_x(IMAGE))
    assert "also feeds" in report.entries[0].reason


def test_bn_before_padded_conv_is_refused_and_before_unpadded_conv_folds():
    model = randomize(
        nn.Sequential(
            nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 3)
        )
    )
    x = _x(IMAGE)
    folded, report = normfuse.fold(model, example_inputs=x)
    by = {e.node: e for e in report.entries}
    assert by["0"].status == "skipped" and "zeros" in by["0"].reason
    assert by["2"].status == "applied" and by["2"].direction == "after"
    with torch.no_grad():
        assert max_rel(folded(x), model(x)) <= 1e-5
    # reflect padding repeats normalised values: folding before it is exact
    reflect = randomize(
        nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"))
    )
    folded, report = normfuse.fold(reflect, example_inputs=x)
    assert report.entries[0].status == "applied"
    with torch.no_grad():
        assert max_rel(folded(x), reflect(x)) <= 1e-5


def test_linear_bn1d_on_sequences_is_refused_with_shapes():
    class Seq(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.bn = nn.Linear(6, 6), nn.BatchNorm1d(6)

        def forward(self, x):
            return self.bn(self.fc(x))  # (N, 6, 6): BN normalises axis 1, the Linear the last

    model = randomize(Seq())
    x = _x((2, 6, 6))
    folded, report = normfuse.fold(model, example_inputs=x)
    assert "rank 3" in report.entries[0].reason
    with torch.no_grad():
        assert max_rel(folded(x), model(x)) == 0


def test_subclasses_and_frozen_batchnorm_look_alikes_fold():
    class MyBN(nn.BatchNorm2d):
        pass

    class FrozenBatchNorm2d(nn.Module):  # torchvision's layout
        def __init__(self, n: int) -> None:
            super().__init__()
            self.eps = 1e-5
            for name, v in (
                ("weight", 1.0),
                ("bias", 0.0),
                ("running_mean", 0.0),
                ("running_var", 1.0),
            ):
                self.register_buffer(name, torch.full((n,), v))

        def forward(self, x):
            scale = self.weight * (self.running_var + self.eps).rsqrt()
            return x * scale.reshape(1, -1, 1, 1) + (self.bias - self.running_mean * scale).reshape(
                1, -1, 1, 1
            )

    model = randomize(
        nn.Sequential(
            nn.Conv2d(3, 4, 3),
            MyBN(4),
            nn.Conv2d(4, 4, 1),
            FrozenBatchNorm2d(4),
            nn.Conv2d(4, 4, 1),
            FrozenBatchNorm(4),
        )
    )
    x = _x(IMAGE)
    folded, report = normfuse.fold(model, example_inputs=x)
    assert [e.status for e in report.entries] == ["applied"] * 3
    with torch.no_grad():
        assert max_rel(folded(x), model(x)) <= 1e-5


def test_subclass_with_its_own_forward_is_not_taken_for_batchnorm():
    class Shifted(nn.BatchNorm2d):
        def forward(self, x):
            return super().forward(x) + 1.0

    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), Shifted(4)))
    x = _x(IMAGE)
    folded, _ = normfuse.fold(model, example_inputs=x)
    with torch.no_grad():
        assert max_rel(folded(x), model(x)) <= 1e-6


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        if x.sum() > 0:  # symbolic tracing cannot decide this
            return self.a(x)
        return self.b(x)


def test_untraceable_model_folds_along_sequential_order():
    model = randomize(DataDependent())
    folded, report = normfuse.fold(model, example_inputs=_x(IMAGE))
    assert any("could not trace" in n for n in report.notes)
    assert len(report.applied) == 2 and count_bn(folded) == 0
    for x in (_x(IMAGE), -_x(IMAGE).abs() - 1):
        with torch.no_grad():
            assert max_rel(folded(x), model(x)) <= 1e-5


def test_chains_bn_after_bn_fold_completely():
    model = randomize(nn.Sequential(nn.Linear(5, 7), nn.BatchNorm1d(7), nn.BatchNorm1d(7)))
    x = _x((4, 5))
    folded, report = normfuse.fold(model, example_inputs=x)
    assert len(report.applied) == 2
    with torch.no_grad():
        assert max_rel(folded(x), model(x)) <= 1e-5


def test_idempotent_and_keeps_dtype_device_and_requires_grad():
    model = randomize(ResNetish()).double()
    model.head.weight.requires_grad_(False)
    x = _x(IMAGE).double()
    once, _ = normfuse.fold(model, example_inputs=x)
    twice, report = normfuse.fold(once, example_inputs=x)
    assert not report.entries
    assert all(p.dtype == torch.float64 for p in twice.parameters())
    assert once.stem[0].bias is not None and once.stem[0].bias.requires_grad
    with torch.no_grad():
        assert max_rel(twice(x), model(x)) <= 1e-12


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights_are_at_least_as_close_as_torch_fusion(dtype):
    """normfuse rounds the float64 result once; torch.nn.utils.fusion computes in the buffers' dtype."""
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    gen = torch.Generator().manual_seed(3)
    conv, bn = nn.Conv2d(16, 32, 3), nn.BatchNorm2d(32)
    seq = randomize(nn.Sequential(conv, bn))
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen))
        conv.bias.copy_(torch.randn(conv.bias.shape, generator=gen))  # not the global RNG's
        bn.running_var.mul_(0.01)  # large scales: rounding matters
    low = copy.deepcopy(seq).to(dtype)
    ref, _ = normfuse.fold(copy.deepcopy(low).double(), check=False)  # the exact fold of `low`
    ours, _ = normfuse.fold(low, check=False)
    theirs = fuse_conv_bn_eval(copy.deepcopy(low[0]), copy.deepcopy(low[1]))
    for name in ("weight", "bias"):
        r = getattr(ref[0], name).detach().double()
        e_ours = (getattr(ours[0], name).detach().double() - r).abs()
        e_theirs = (getattr(theirs, name).detach().double() - r).abs()
        assert float(e_ours.max()) <= float(e_theirs.max())
        assert float(e_ours.mean()) < float(e_theirs.mean())
    x = _x((2, 16, 8, 8)).to(dtype)
    with torch.no_grad():
        want = ref(x.double())
        err_ours = max_rel(ours(x), want)
        err_theirs = max_rel(theirs(x), want)
    assert err_ours <= err_theirs * 1.02


def test_check_failure_raises_parity_error(monkeypatch):
    import normfuse.torchmodel.surgery as surgery

    real = surgery.fold_pair

    def corrupt(gm, pair, clone, counter):
        reason = real(gm, pair, clone, counter)
        with torch.no_grad():
            pair.lin.weight.mul_(1.01)
        return reason

    monkeypatch.setattr(surgery, "fold_pair", corrupt)
    with pytest.raises(normfuse.ParityError):
        fold_torch(randomize(ResNetish()), example_inputs=_x(IMAGE))


def test_strict_raises_when_something_was_skipped():
    model = randomize(TwiceCalled())
    with pytest.raises(StrictError):
        normfuse.fold(model, example_inputs=_x(IMAGE), strict=True)


def test_inplace_changes_the_model_itself():
    model = randomize(BNMLP())
    folded, report = fold_torch(model, example_inputs=_x((4, 12)), inplace=True)
    assert folded is model and count_bn(model) == 0
    assert any("parity not checked" in n for n in report.notes), report.notes


class _TokenMLP(nn.Module):
    """A Linear on (B, T, C) tokens, then a BatchNorm1d over T (T == C, so both shapes run)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc, self.bn, self.head = nn.Linear(8, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.fc(x)))


@pytest.mark.parametrize("given", ["none", "tokens", "vectors"])
def test_a_linear_next_to_a_batchnorm1d_folds_only_on_nc_data_the_caller_shows(given):
    """Without example_inputs the data's rank is unknown: a generated (N, C) input runs, and so
    does the (B, T, C) data this model is made for (where the fold is wrong, max rel ~1). The pair
    is refused with the fix; with the caller's (N, C) inputs it folds, with (B, T, C) it stays."""
    model = randomize(_TokenMLP())
    tokens = _x((2, 8, 8))
    inputs = {"none": None, "tokens": tokens, "vectors": _x((4, 8))}[given]
    folded, report = fold_torch(model, example_inputs=inputs)
    pair = next(e for e in report.entries if e.node == "bn")
    if given == "vectors":
        assert pair.status == "applied"
        return
    assert pair.status == "skipped", pair
    assert ("unknown rank" if given == "none" else "rank 3") in pair.reason
    assert (pair.fix is not None and "example_inputs" in pair.fix) == (given == "none")
    with torch.no_grad():
        torch.testing.assert_close(folded(tokens), model(tokens), rtol=0, atol=0)


def _conv_cls(transpose: bool, dims: int) -> type:
    name = f"{'ConvTranspose' if transpose else 'Conv'}{dims}d"
    return getattr(nn, name)


try:
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st
except ImportError:  # pragma: no cover - hypothesis is a test dependency
    pass
else:

    @settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    @given(
        transpose=st.booleans(),
        dims=st.integers(1, 3),
        groups=st.sampled_from([1, 2, 3]),
        cin_per=st.integers(1, 3),
        cout_per=st.integers(1, 3),
        k=st.integers(1, 3),
        stride=st.integers(1, 2),
        pad=st.integers(0, 1),
        bias=st.booleans(),
        before=st.booleans(),
        seed=st.integers(0, 2**16),
    )
    def test_property_random_convolutions_fold_exactly(
        transpose, dims, groups, cin_per, cout_per, k, stride, pad, bias, before, seed
    ):
        cin, cout = groups * cin_per, groups * cout_per
        conv = _conv_cls(transpose, dims)(cin, cout, k, stride, pad, groups=groups, bias=bias)
        bn_cls = getattr(nn, f"BatchNorm{dims}d")
        layers = [bn_cls(cin), conv] if before else [conv, bn_cls(cout)]
        model = randomize(nn.Sequential(*layers), seed)
        x = _x((2, cin, *([5] * dims)), seed)
        folded, report = normfuse.fold(model, example_inputs=x)
        (entry,) = report.entries
        if before and (pad or transpose):
            assert entry.status == "skipped"  # zero padding / transposed: not exact
        else:
            assert entry.status == "applied", entry.reason
        with torch.no_grad():
            assert max_rel(folded(x), model(x)) <= 1e-5


def _hooked(kind: str) -> nn.Module:
    """Conv -> BN where the conv's weight is computed at each call, or a hook changes an output:
    what torch.fx does not trace, so a fold once wrote the plain forward in their place."""
    conv = nn.Conv2d(3, 8, 3)
    if kind == "weight_norm":
        conv = torch.nn.utils.parametrizations.weight_norm(conv)
    elif kind == "spectral_norm":
        conv = torch.nn.utils.parametrizations.spectral_norm(conv)
    elif kind == "old weight_norm":
        with pytest.warns(FutureWarning):
            conv = torch.nn.utils.weight_norm(conv)
    model = randomize(nn.Sequential(conv, nn.BatchNorm2d(8)))
    if kind == "bn hook":
        model[1].register_forward_hook(lambda m, i, o: o * 2 + 1)
    elif kind == "conv hook":
        model[0].register_forward_hook(lambda m, i, o: o * 2 + 1)
    elif kind == "conv pre-hook":
        model[0].register_forward_pre_hook(lambda m, i: (i[0] * 0.5,))
    return model.eval()


@pytest.mark.parametrize(
    "kind",
    ["weight_norm", "spectral_norm", "old weight_norm", "bn hook", "conv hook", "conv pre-hook"],
)
@pytest.mark.parametrize("form", ["module", "graphmodule"])
def test_hooks_and_parametrized_weights_are_not_folded_away(kind, form):
    model = _hooked(kind)
    x = _x(IMAGE)
    with torch.no_grad():
        ref = model(x)
        given = fx.symbolic_trace(model) if form == "graphmodule" else model
        folded, report = normfuse.fold(given, example_inputs=(x,), check=False)
        out = folded(x)
    assert not report.applied and len(report.skipped) == 1, report.summary()
    reason = report.skipped[0].reason
    assert "hooks" in reason or "parametrized" in reason, reason
    assert torch.equal(out, ref)


class _Branchy(nn.Module):
    """torch.fx cannot trace the branch; torch.export can, and its pairs are folded back into
    the modules: a hook on the BN there once was lost too."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn = nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 4:
            return self.bn(self.conv(x))
        return x


def test_a_hook_is_kept_where_torch_export_found_the_pair():
    model = randomize(_Branchy()).eval()
    model.bn.register_forward_hook(lambda m, i, o: o * 2 + 1)
    x = _x(IMAGE)
    with torch.no_grad():
        ref = model(x)
        folded, report = normfuse.fold(model, example_inputs=(x,), check=False)
        assert torch.equal(folded(x), ref)
    assert not report.applied and "hooks" in report.skipped[0].reason


class _BranchyHead(nn.Module):
    """BN1d -> eval Dropout -> Linear in a model torch.fx cannot trace: torch.export drops the
    dropout, and the pair it shows was once folded across the module (whose output then
    changed: the check refused it as "please report")."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.head = nn.Sequential(nn.BatchNorm1d(8), nn.Dropout(0.2), nn.Linear(8, 4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).relu()
        if x.shape[-1] > 1:
            x = x * 1.0
        return self.head(x.mean((2, 3)))


def test_no_fold_across_a_module_that_torch_export_drops():
    model = randomize(_BranchyHead()).eval()
    x = _x(IMAGE)
    with torch.no_grad():
        ref = model(x)
        folded, report = normfuse.fold(model, example_inputs=(x,))  # the default check
        assert torch.equal(folded(x), ref)
    (entry,) = report.skipped
    assert "through module 'head.1'" in entry.reason and not report.applied


class _ReadsWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) + F.conv2d(x, self.a.weight, None, padding=1)


class _ReadsBias(_ReadsWeight):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) + self.a.bias.view(1, -1, 1, 1)


class _ReadsNormWeight(_ReadsWeight):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.a(x)) * self.bn.weight.view(1, -1, 1, 1)


@pytest.mark.parametrize("cls", [_ReadsWeight, _ReadsBias, _ReadsNormWeight])
@pytest.mark.parametrize("form", ["module", "graphmodule"])
def test_a_tensor_forward_reads_itself_keeps_its_value(cls, form):
    """forward() reads the conv's weight or bias, or the norm's weight, beside calling the
    module: the nn.Module path once rescaled or removed them under that read (output 11-48%
    off, or AttributeError). It refuses now; a GraphModule gives the op a private copy."""
    model = randomize(cls()).eval()
    x = _x(IMAGE)
    with torch.no_grad():
        ref = model(x)
        given = fx.symbolic_trace(model) if form == "graphmodule" else model
        folded, report = normfuse.fold(given, example_inputs=(x,))  # the default check
        assert max_rel(folded(x), ref) < 1e-5
    if form == "module":
        assert not report.applied and "also reads" in report.skipped[0].reason
    else:
        assert report.applied


class _ShapeRead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        return self.fc(y).reshape(y.shape[0], -1)


def test_a_norm_folded_forward_leaves_no_call_behind_for_a_shape_read():
    """BN folded into the Linear after it, its output's shape also read (visformer's attention):
    the GraphModule once kept calling the BN for the shape while the report said folded."""
    model = randomize(_ShapeRead()).eval()
    x = _x((6, 8))
    with torch.no_grad():
        folded, report = normfuse.fold(fx.symbolic_trace(model), example_inputs=(x,))
        assert max_rel(folded(x), model(x)) < 1e-6
    assert len(report.applied) == 1
    assert not [n for n in folded.graph.nodes if n.op == "call_module" and n.target == "bn"]


class _SharedStem(nn.Module):
    """maxvit's block: the stem conv's output feeds a pooled shortcut and a BN, the BN a 1x1
    conv: the BN cannot go into the stem (its output is read twice) but goes into the 1x1."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.bn = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.pw, self.pool = nn.Conv2d(8, 8, 1), nn.AvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        return self.pool(y) + self.pw(self.bn(y))


def _as_form(form: str, model: nn.Module, x: torch.Tensor):
    """``model`` as given to fold on one of the three PyTorch paths."""
    if form == "graphmodule":
        return fx.symbolic_trace(model)
    return torch.export.export(model, (x,)) if form == "exported" else model


def _fold_in_form(form: str, model: nn.Module, x: torch.Tensor):
    """Fold ``model`` as given on ``form``'s path with the default check, compare the result
    with the original on ``x`` (within 1e-5), and return what runs and the report."""
    with torch.no_grad():
        ref = model(x)
    folded, report = normfuse.fold(_as_form(form, model, x), example_inputs=(x,))
    run = folded.module() if form == "exported" else folded
    with torch.no_grad():
        assert max_rel(run(x), ref) < 1e-5
    return run, report


@pytest.mark.parametrize("form", ["module", "graphmodule", "exported"])
def test_a_norm_after_a_shared_conv_folds_into_the_conv_after_it(form):
    model = randomize(_SharedStem()).eval()
    _, report = _fold_in_form(form, model, _x(IMAGE))
    assert [e.direction for e in report.applied] == ["before"] and not report.skipped


class _DoubleBNLinear(nn.Module):
    def __init__(self):
        super().__init__()
        self.l1, self.b1, self.b2, self.l2 = (
            nn.Linear(8, 8),
            nn.BatchNorm1d(8),
            nn.BatchNorm1d(8),
            nn.Linear(8, 4),
        )

    def forward(self, x):
        return self.l2(self.b2(self.b1(self.l1(x))))


def _double_bn_conv():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.BatchNorm2d(8), nn.Conv2d(8, 4, 1)
    )


@pytest.mark.parametrize("form", ["module", "graphmodule", "exported"])
@pytest.mark.parametrize("build", [_DoubleBNLinear, _double_bn_conv], ids=["linear", "conv"])
def test_two_norms_between_two_linear_ops_fold_one_each_way(form, build):
    """The first BN folds after into the op before it, the second before into the op after it
    (which then reads the first op's output): it crashed with 'used before it has been
    defined' on all three paths."""
    model = randomize(build()).eval()
    x = _x((4, 8) if build is _DoubleBNLinear else (2, 3, 8, 8))
    run, report = _fold_in_form(form, model, x)
    assert sorted(e.direction for e in report.applied) == ["after", "before"]
    assert not report.skipped
    assert count_bn(run) == 0


@pytest.mark.parametrize("action", ["swap", "insert", "recalibrate"])
def test_an_exported_program_is_refused_where_norms_must_be_modules(action):
    """swap/insert/recalibrate on an ExportedProgram raised a raw AttributeError."""
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8))).eval()
    x = torch.randn(2, 3, 8, 8)
    ep = torch.export.export(model, (x,))
    call = {
        "swap": lambda: normfuse.swap(ep, to="frozen"),
        "insert": lambda: normfuse.insert(ep, (x,)),
        "recalibrate": lambda: normfuse.recalibrate(ep, [x]),
    }[action]
    with pytest.raises(normfuse.InputError, match="not an ExportedProgram") as info:
        call()
    assert "the nn.Module it was exported from" in str(info.value.note)


@pytest.mark.parametrize(
    "option",
    [{"norm_affine": True}, {"provider": "cuda"}, {"seed": 5}, {"shapes": {"x": [1, 3, 8, 8]}}],
    ids=["norm_affine", "provider", "seed", "shapes"],
)
def test_onnx_only_options_are_refused_for_a_pytorch_model(option):
    """They were accepted and ignored: norm_affine=True folded no LayerNorm and said nothing."""
    model = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 4)).eval()
    with pytest.raises(normfuse.InputError, match="to ONNX models") as info:
        normfuse.fold(model, example_inputs=torch.randn(2, 8), **option)
    assert "normfuse.export" in str(info.value.note)


@pytest.mark.parametrize("form", ["module", "graphmodule", "exported"])
@pytest.mark.parametrize("mode", ["reflect", "replicate", "circular"])
def test_bn_folds_before_a_conv_that_pads_by_repeating(form, mode):
    """torch.export writes Conv2d(padding_mode=...) as aten.pad then an unpadded conv: the BN
    before it folded on the nn.Module path only ("feeds pad.default: no Conv/Linear")."""
    model = randomize(
        nn.Sequential(nn.BatchNorm2d(8), nn.Conv2d(8, 6, 3, padding=1, padding_mode=mode))
    ).eval()
    _, report = _fold_in_form(form, model, _x((2, 8, 7, 6)))
    assert [e.direction for e in report.applied] == ["before"] and not report.skipped


class _BNThenTransposedLinear(nn.Module):
    """BatchNorm1d on (B, C, T), then (B, T, C) into a Linear: a conformer's conv module."""

    def __init__(self):
        super().__init__()
        self.bn, self.fc = nn.BatchNorm1d(8), nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(self.bn(x).transpose(1, 2))


class _LinearThenPermutedBN(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc, self.bn = nn.Linear(6, 8), nn.BatchNorm1d(8)

    def forward(self, x):
        return self.bn(self.fc(x).permute(0, 2, 1))


class _BN2dChannelsLast(nn.Module):
    """BatchNorm2d, then NHWC into a pointwise Linear (ConvNeXt-style)."""

    def __init__(self, last: int = 1):
        super().__init__()
        self.bn, self.fc, self.last = nn.BatchNorm2d(4), nn.Linear(4, 3), last

    def forward(self, x):
        order = [0, 2, 3, 1] if self.last == 1 else [0, 1, 3, 2]
        return self.fc(self.bn(x).permute(*order))


@pytest.mark.parametrize("form", ["module", "graphmodule", "exported"])
@pytest.mark.parametrize(
    ("build", "shape", "direction"),
    [
        (_BNThenTransposedLinear, (2, 8, 5), "before"),
        (_LinearThenPermutedBN, (2, 5, 6), "after"),
        (_BN2dChannelsLast, (2, 4, 3, 4), "before"),
    ],
    ids=["bn-transpose-linear", "linear-permute-bn", "bn2d-nhwc-linear"],
)
def test_a_norm_folds_through_a_transpose_that_makes_its_channels_features(
    form, build, shape, direction
):
    """The ONNX side folded these (its layout paths); the PyTorch paths left them."""
    model = randomize(build()).eval()
    run, report = _fold_in_form(form, model, _x(shape))
    assert [e.direction for e in report.applied] == [direction] and not report.skipped
    assert count_bn(run) == 0


def test_a_transpose_that_puts_another_axis_last_does_not_fold():
    model = randomize(_BN2dChannelsLast(last=3)).eval()  # the Linear reads H, not channels
    x = _x((2, 4, 4, 4))  # H == C == 4: only the axes tell them apart
    folded, report = normfuse.fold(model, example_inputs=(x,))
    assert not report.applied and len(report.skipped) == 1
    with torch.no_grad():
        assert max_rel(folded(x), model(x)) == 0


class _ShapeReadBesideBN(nn.Module):
    """YOLOv8's C2f outputs: the Detect head reads their shape (``b, c, h, w = y.shape``)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv, self.bn = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        y = self.conv(self.stem(x))
        b, c, h, w = y.shape
        return F.silu(self.bn(y)).reshape(b, c, h * w)


def test_a_dynamic_size_read_beside_a_bn_does_not_stop_the_fold():
    """With dynamic H and W torch.export reads them with ``sym_size.int``: a shape read, no
    data use; it blocked Conv -> BN (static shapes folded)."""
    model = randomize(_ShapeReadBesideBN()).eval()
    x = _x((2, 3, 8, 8))
    h, w = torch.export.Dim("h", min=1, max=16), torch.export.Dim("w", min=1, max=16)
    ep = torch.export.export(model, (x,), dynamic_shapes=({2: 4 * h, 3: 4 * w},))
    assert any("sym_size" in str(n.target) for n in ep.graph.nodes)
    folded, report = normfuse.fold(ep)
    assert len(report.applied) == 1 and not report.skipped
    for shape in ((2, 3, 8, 8), (2, 3, 12, 20)):
        x = _x(shape, 1)
        with torch.no_grad():
            assert max_rel(folded.module()(x), model(x)) < 1e-5
