"""Issue 17: PyTorch models as people have them (timm's norm+activation layers, modules torch.fx
cannot trace, frozen BN inside graphs, BatchNorm1d on flattened tokens, branch/concat BN).

Every pattern is reproduced by a hand-written module here, so these tests need no timm; a few
small timm-backed cases run when timm imports (see ``tests/timm_shim.py``).

Tests marked ``xfail(strict=True)`` reproduce a defect of the issue: they fail today and must
start passing (and then lose the mark) when it is fixed. Unmarked tests pass today and guard
what must keep working, or what a fix must not break.

Accuracy is measured against a float64 run of the original: ``max|out - ref64| / max|ref64|``.
"""

from __future__ import annotations

import copy
import operator
import re
from typing import Any

import pytest

torch = pytest.importorskip("torch")

import torch.nn.functional as F  # noqa: E402
from torch import fx, nn  # noqa: E402

import normfuse  # noqa: E402
from tests.timm_shim import import_timm  # noqa: E402

ParityError = normfuse.ParityError

# deep copies of exported programs inside torch: noise, not ours
pytestmark = pytest.mark.filterwarnings("ignore:.*LeafSpec.*:FutureWarning")


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """These models are tiny: one intra-op thread is faster, and on a busy 2-core machine the
    OpenMP workers' spinning made a single check take minutes (timm tf_efficientnet_lite0)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


TOL = 1e-5  # of the output's largest magnitude

ISSUE = "issue 17: "


def xfail(what: str) -> Any:
    return pytest.mark.xfail(strict=True, reason=ISSUE + what)


# --------------------------------------------------------------------------------- the patterns


class BatchNormAct2d(nn.BatchNorm2d):
    """As timm's ``BatchNormAct2d``: a BatchNorm2d subclass whose forward is BN, drop, act.

    Like timm's, it asserts the rank (reading ``x.ndim``) and calls ``F.batch_norm`` itself.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float = 0.1,
        act: type[nn.Module] | None = nn.ReLU,
        drop: type[nn.Module] | None = None,
    ) -> None:
        super().__init__(num_features, eps=eps, momentum=momentum)
        self.drop = drop() if drop is not None else nn.Identity()
        self.act = act() if act is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        torch._assert(x.ndim == 4, f"expected 4D input (got {x.ndim}D input)")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)
        bn_training = self.training or (self.running_mean is None and self.running_var is None)
        x = F.batch_norm(
            x,
            self.running_mean if not self.training or self.track_running_stats else None,
            self.running_var if not self.training or self.track_running_stats else None,
            self.weight,
            self.bias,
            bn_training,
            factor,
            self.eps,
        )
        x = self.drop(x)
        return self.act(x)


class FrozenBatchNormAct2d(nn.Module):
    """As timm's ``FrozenBatchNormAct2d``: frozen BN (four buffers, ``eps``) then drop and act."""

    def __init__(self, num_features: int, eps: float = 1e-5, act: type[nn.Module] = nn.ReLU):
        super().__init__()
        self.eps = eps
        self.num_features = num_features
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))
        self.drop = nn.Identity()
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.reshape(1, -1, 1, 1)
        b = self.bias.reshape(1, -1, 1, 1)
        rv = self.running_var.reshape(1, -1, 1, 1)
        rm = self.running_mean.reshape(1, -1, 1, 1)
        scale = w * (rv + self.eps).rsqrt()
        bias = b - rm * scale
        x = x * scale + bias
        return self.act(self.drop(x))


def freeze(module: nn.Module) -> nn.Module:
    """As timm's ``freeze_batch_norm_2d``, for :class:`BatchNormAct2d` (in place, returns it)."""
    if isinstance(module, BatchNormAct2d):
        frozen = FrozenBatchNormAct2d(module.num_features, module.eps)
        with torch.no_grad():
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(frozen, name).copy_(getattr(module, name))
        frozen.drop, frozen.act = module.drop, module.act
        return frozen.train(module.training)
    for name, child in module.named_children():
        new = freeze(child)
        if new is not child:
            setattr(module, name, new)
    return module


class ConvNormAct(nn.Module):
    """As timm's ``ConvNormAct``: a conv, then a :class:`BatchNormAct2d` (not an nn.Sequential)."""

    def __init__(
        self, cin: int, cout: int, k: int = 3, stride: int = 1, groups: int = 1, act=nn.ReLU
    ):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False)
        self.bn = BatchNormAct2d(cout, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class TinyNormActNet(nn.Module):
    """An EfficientNet-like stack on BatchNormAct2d: stem, depthwise, projection (no act),
    a residual, pooling and a head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = ConvNormAct(3, 8, stride=2, act=nn.SiLU)
        self.dw = ConvNormAct(8, 8, groups=8, act=nn.SiLU)
        self.pw = nn.Conv2d(8, 8, 1, bias=False)
        self.pw_bn = BatchNormAct2d(8, act=None)
        self.head_conv = ConvNormAct(8, 16, k=1, act=nn.ReLU)
        self.fc = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.pw_bn(self.pw(self.dw(x)))
        x = self.head_conv(x)
        return self.fc(x.mean((2, 3)))


def norm_act_minimal() -> nn.Module:
    """The minimal case of the issue."""
    return nn.Sequential(nn.Conv2d(3, 8, 3), BatchNormAct2d(8, act=nn.ReLU))


class CBR(nn.Module):
    """conv, BatchNorm2d, ReLU as attributes (not an nn.Sequential)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.bn(self.conv(x)))


class DataDependent(nn.Module):
    """torch.fx cannot trace it (nor torch.export): a branch on the data. Its blocks trace."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = CBR(3, 8), CBR(8, 8), CBR(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        if x.sum() > 0:  # noqa: SIM108 (a Python branch on the data, on purpose)
            x = self.b(x)
        else:
            x = self.c(x)
        return x


class ShapeDependent(DataDependent):
    """torch.fx cannot trace it; torch.export can (shapes are known there): a branch on a size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.a(x)
        if x.shape[-1] % 2 == 0:
            x = self.b(x)
        return self.c(x)


class ConvThenAffine(nn.Module):
    """A frozen BN written out as per-channel mul/add with buffers (how it looks after export)."""

    def __init__(self, c: int = 8, per_channel: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3)
        self.per_channel = per_channel
        shape = (c,) if per_channel else (14,)
        self.register_buffer("scale", torch.ones(shape))
        self.register_buffer("shift", torch.zeros(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.per_channel:
            y = y * self.scale.view(1, -1, 1, 1) + self.shift.view(1, -1, 1, 1)
        else:  # per column: not a channel affine, must not fold
            y = y * self.scale.view(1, 1, 1, -1) + self.shift.view(1, 1, 1, -1)
        return torch.relu(y)


class LinearNorm(nn.Module):
    """As timm's LeViT ``LinearNorm``: BatchNorm1d over the features of flattened tokens."""

    def __init__(self, cin: int = 16, cout: int = 24) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout, bias=False)
        self.bn = nn.BatchNorm1d(cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LinearNormByPosition(nn.Module):
    """BatchNorm1d over (token, feature) pairs: the Linear's features do not map one to one."""

    def __init__(self, tokens: int = 7, cin: int = 16, cout: int = 24) -> None:
        super().__init__()
        self.linear = nn.Linear(cin, cout)
        self.bn = nn.BatchNorm1d(tokens * cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(1)).reshape_as(x)


class RepVggBlock(nn.Module):
    """As timm's RepVGG block: 3x3 conv-BN + 1x1 conv-BN + BN on the block input."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = CBR(3, c)
        self.conv_kxk = nn.Sequential(nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c))
        self.conv_1x1 = nn.Sequential(nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c))
        self.skip_bn = nn.BatchNorm2d(c)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        return self.act(self.conv_kxk(x) + self.conv_1x1(x) + self.skip_bn(x))


class ConcatNorm(nn.Module):
    """As DPN/DenseNet: BN (then act, then conv) on a concatenation of conv outputs."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.left = nn.Conv2d(3, c, 3, padding=1)
        self.right = nn.Conv2d(3, c, 1)
        self.bn = nn.BatchNorm2d(2 * c)
        self.act = nn.ReLU()
        self.head = nn.Conv2d(2 * c, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.left(x), self.right(x)], 1)
        return self.head(self.act(self.bn(y)))


class MetadataRead(nn.Module):
    """conv -> BatchNorm2d, where the conv's output is also read for metadata only."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.kind == "ndim":
            torch._assert(y.ndim == 4, "4-D")
        elif self.kind == "shape":
            torch._assert(y.shape[1] == 8, "8 channels")
        elif self.kind == "size":
            torch._assert(y.size(1) == 8, "8 channels")
        elif self.kind == "dim":
            torch._assert(y.dim() == 4, "4-D")
        elif self.kind == "dtype":
            torch._assert(y.dtype.is_floating_point, "floating")  # the check runs in float64 too
        elif self.kind == "device":
            return self.bn(y) + torch.zeros((), dtype=x.dtype, device=y.device)
        return self.bn(y)


# ------------------------------------------------------------------------------------- helpers


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Seeded weights for every Conv/Linear, and random non-trivial statistics on every BN-like
    module and ``scale``/``shift`` buffer: means far from 0, variances from 0.05 to 20, gamma
    partly negative, beta non-zero; eval mode."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.conv._ConvNd | nn.Linear):
                fan_in = m.weight[0].numel()
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen) / fan_in**0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)
            rm, rv = getattr(m, "running_mean", None), getattr(m, "running_var", None)
            if isinstance(rm, torch.Tensor) and isinstance(rv, torch.Tensor):
                c = rm.numel()
                rm.copy_(torch.randn(c, generator=gen) * 2.0)
                rv.copy_(torch.exp(torch.empty(c).uniform_(-3.0, 3.0, generator=gen)))
                w, b = getattr(m, "weight", None), getattr(m, "bias", None)
                if isinstance(w, torch.Tensor) and isinstance(b, torch.Tensor):
                    sign = torch.where(torch.rand(c, generator=gen) < 0.3, -1.0, 1.0)
                    w.copy_((torch.rand(c, generator=gen) * 1.5 + 0.25) * sign)
                    b.copy_(torch.randn(c, generator=gen))
            for name in ("scale", "shift"):
                t = m._buffers.get(name)
                if isinstance(t, torch.Tensor):
                    t.copy_(torch.randn(t.shape, generator=gen) + (1.0 if name == "scale" else 0.0))
    return model.eval()


def timm_model(timm: Any, name: str, seed: int, **kwargs: Any) -> nn.Module:
    """``timm.create_model`` under a fixed seed (the global RNG is restored afterwards)."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model(name, pretrained=False, **kwargs)
    return randomize(model, seed)


def image(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def run(model: Any, x: torch.Tensor) -> torch.Tensor:
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    with torch.no_grad():
        return model(x)


def ref64(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The original in float64: the reference every result is measured against."""
    m = copy.deepcopy(model).double().eval()
    with torch.no_grad():
        return m(x.double())


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    return float((out - ref).abs().max() / ref.abs().max().clamp_min(1e-30))


_BN_FUNCS = {
    F.batch_norm,
    torch.batch_norm,
    torch.ops.aten.batch_norm.default,
    torch.ops.aten._native_batch_norm_legit_no_training.default,
}
_MUL_FUNCS = {operator.mul, torch.mul, torch.ops.aten.mul.Tensor}


def _graph(model: Any) -> fx.Graph | None:
    if isinstance(model, torch.export.ExportedProgram):
        return model.graph
    if isinstance(model, fx.GraphModule):
        return model.graph
    return None


def bn_left(model: Any) -> int:
    """BatchNorm modules (and frozen look-alikes) plus functional batch_norm calls left."""
    n = 0
    graph = _graph(model)
    if graph is not None:
        n += sum(
            1 for node in graph.nodes if node.op == "call_function" and node.target in _BN_FUNCS
        )
    if isinstance(model, nn.Module):
        live = None
        if isinstance(model, fx.GraphModule):
            live = {str(node.target) for node in model.graph.nodes if node.op == "call_module"}
        for name, m in model.named_modules():
            if live is not None and name not in live:
                continue
            if (
                isinstance(m, nn.modules.batchnorm._BatchNorm)
                or "FrozenBatchNorm" in type(m).__name__
            ):
                n += 1
    return n


def mul_left(model: Any) -> int:
    graph = _graph(model)
    assert graph is not None
    return sum(
        1 for node in graph.nodes if node.op == "call_function" and node.target in _MUL_FUNCS
    )


def has(model: Any, cls: type) -> bool:
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    return any(isinstance(m, cls) for m in model.modules())


def export(model: nn.Module, x: torch.Tensor) -> torch.export.ExportedProgram:
    return torch.export.export(model, (x,))


def as_path(model: nn.Module, x: torch.Tensor, path: str) -> Any:
    if path == "module":
        return model
    if path == "graphmodule":
        return fx.symbolic_trace(model)
    return export(model, x)


def reasons(report: Any) -> dict[str, str]:
    return {e.node: e.reason or "" for e in report.skipped}


# ------------------------------------------------------------------- 1. wrong results: frozen act


FROZEN_MODELS = {
    "minimal": lambda: freeze(randomize(norm_act_minimal(), 3)),
    "tiny_net": lambda: freeze(randomize(TinyNormActNet(), 4)),
}


@pytest.mark.parametrize("which", sorted(FROZEN_MODELS))
def test_fold_frozen_norm_act_without_example_inputs_is_right(which):
    model = FROZEN_MODELS[which]()
    x = image(2, 3, 16, 16)
    folded, _report = normfuse.fold(model)
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


@pytest.mark.parametrize("which", sorted(FROZEN_MODELS))
def test_fold_frozen_norm_act_keeps_activation(which):
    model = FROZEN_MODELS[which]()
    x = image(2, 3, 16, 16)
    folded, report = normfuse.fold(model, example_inputs=x)
    assert report.applied
    assert bn_left(folded) == 0
    assert has(folded, nn.ReLU), folded
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


def test_fold_frozen_norm_act_with_example_inputs_is_never_silently_wrong():
    """Today the check catches the dropped activation; whatever a fix does, no wrong model."""
    model = FROZEN_MODELS["minimal"]()
    x = image(2, 3, 16, 16)
    try:
        folded, _ = normfuse.fold(model, example_inputs=x)
    except ParityError:
        return
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


@pytest.mark.parametrize(
    "which",
    ["norm_act", "tiny_net", "frozen_minimal", "frozen_tiny_net"],
)
def test_fold_without_example_inputs_says_whether_it_compared(which):
    """No claim of a check that did not run: either a parity result, or a note saying so."""
    model = {
        "norm_act": lambda: randomize(norm_act_minimal(), 5),
        "tiny_net": lambda: randomize(TinyNormActNet(), 6),
        "frozen_minimal": FROZEN_MODELS["minimal"],
        "frozen_tiny_net": FROZEN_MODELS["tiny_net"],
    }[which]()
    _, report = normfuse.fold(model)
    if report.parity is None:
        assert any("not compared" in n for n in report.notes), report.notes
    else:
        assert report.parity.passed


@pytest.mark.parametrize(
    "which",
    [
        "norm_act",
        "tiny_net",
        pytest.param(
            "frozen_minimal",
        ),
    ],
)
def test_fold_without_example_inputs_result_is_right(which):
    model = {
        "norm_act": lambda: randomize(norm_act_minimal(), 7),
        "tiny_net": lambda: randomize(TinyNormActNet(), 8),
        "frozen_minimal": FROZEN_MODELS["minimal"],
    }[which]()
    x = image(2, 3, 16, 16)
    folded, _ = normfuse.fold(model)
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


# ----------------------------------------------------------------- 2. wrong results: swap drops act


@pytest.mark.parametrize("which", ["minimal", "tiny_net"])
def test_swap_frozen_keeps_activation_and_is_exact(which):
    model = randomize(norm_act_minimal() if which == "minimal" else TinyNormActNet(), 9)
    x = image(2, 3, 16, 16)
    swapped, report = normfuse.swap(model, to="frozen")
    assert report.applied
    assert all(e.exact for e in report.applied)
    out, ref = run(swapped, x), run(model, x)
    assert torch.equal(out, ref), f"max |diff| {float((out - ref).abs().max()):.3g}"
    assert has(swapped, nn.ReLU)


def test_swap_groupnorm_keeps_activation():
    model = randomize(norm_act_minimal(), 10)
    x = image(2, 3, 16, 16)
    swapped, report = normfuse.swap(model, to="groupnorm")
    assert report.applied
    assert has(swapped, nn.GroupNorm)
    assert has(swapped, nn.ReLU), swapped
    out = run(swapped, x)
    assert bool((out >= 0).all()), f"min output {float(out.min()):.3g}: the ReLU is not applied"


def test_swap_frozen_norm_act_back_to_batchnorm_keeps_activation():
    model = FROZEN_MODELS["minimal"]()
    x = image(2, 3, 16, 16)
    swapped, report = normfuse.swap(model, to="batchnorm")
    assert report.applied
    out, ref = run(swapped, x), run(model, x)
    # the same function (BatchNorm in eval vs its frozen form), rounded in another order
    assert rel_err(out, ref) <= TOL, (
        f"max |diff| {float((out - ref).abs().max()):.3g}, exact={[e.exact for e in report.applied]}"
    )
    assert bool((out >= 0).all()), "the ReLU after the norm is gone"


def test_swap_entries_marked_exact_are_exact():
    model = randomize(TinyNormActNet(), 11)
    x = image(2, 3, 16, 16)
    swapped, report = normfuse.swap(model, to="frozen")
    claimed = [e for e in report.applied if e.exact]
    assert claimed
    assert rel_err(run(swapped, x), ref64(model, x)) <= TOL


# ------------------------------------------------------------------ 3. coverage: BatchNormAct2d


NORM_ACT_MODELS = {"minimal": norm_act_minimal, "tiny_net": TinyNormActNet}


@pytest.mark.parametrize("which", sorted(NORM_ACT_MODELS))
@pytest.mark.parametrize("path", ["module", "graphmodule"])
def test_norm_act_folds(which, path):
    model = randomize(NORM_ACT_MODELS[which](), 12)
    x = image(2, 3, 16, 16)
    folded, report = normfuse.fold(as_path(model, x, path), example_inputs=x)
    assert report.applied, reasons(report)
    assert not report.skipped, reasons(report)
    assert bn_left(folded) == 0
    if path == "module":
        assert type(folded) is type(model)
        assert has(folded, nn.ReLU)
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


@pytest.mark.parametrize("which", sorted(NORM_ACT_MODELS))
def test_norm_act_folds_on_exported_program(which):
    """torch.export drops the ndim read: this path folds BatchNormAct2d today."""
    model = randomize(NORM_ACT_MODELS[which](), 13)
    x = image(2, 3, 16, 16)
    folded, report = normfuse.fold(export(model, x))
    assert report.applied and not report.skipped, reasons(report)
    assert bn_left(folded) == 0
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


METADATA = ["ndim", "shape", "size", "dim", "dtype", "device"]


@pytest.mark.parametrize("kind", METADATA)
@pytest.mark.parametrize("path", ["module", "graphmodule"])
def test_metadata_reads_do_not_block_fold(kind, path):
    model = randomize(MetadataRead(kind), 14)
    x = image(2, 3, 12, 12)
    folded, report = normfuse.fold(as_path(model, x, path), example_inputs=x)
    assert len(report.applied) == 1, reasons(report)
    assert bn_left(folded) == 0
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


# ----------------------------------------------------------- 4. coverage: modules fx cannot trace


UNTRACEABLE = {"data_dependent": DataDependent, "shape_dependent": ShapeDependent}


@pytest.mark.parametrize("which", sorted(UNTRACEABLE))
def test_untraceable_module_folds_its_blocks(which):
    model = randomize(UNTRACEABLE[which](), 15)
    x = image(2, 3, 12, 12)
    folded, report = normfuse.fold(model, example_inputs=x)
    assert type(folded) is type(model)
    assert len(report.applied) == 3, (reasons(report), report.notes)
    assert bn_left(folded) == 0
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


def test_untraceable_module_reports_every_norm():
    model = randomize(DataDependent(), 16)
    x = image(2, 3, 12, 12)
    _, report = normfuse.fold(model, example_inputs=x)
    assert len(report.entries) == 3, report.notes


@pytest.mark.parametrize("which", sorted(UNTRACEABLE))
def test_untraceable_module_result_is_right(which):
    model = randomize(UNTRACEABLE[which](), 17)
    x = image(2, 3, 12, 12)
    folded, report = normfuse.fold(model, example_inputs=x)
    assert report.parity is not None and report.parity.passed
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


# ---------------------------------------------------- 5. coverage: frozen BN as mul/add in graphs


@pytest.mark.parametrize("path", ["graphmodule", "exported"])
def test_per_channel_affine_after_conv_folds(path):
    model = randomize(ConvThenAffine(), 18)
    x = image(2, 3, 16, 16)
    folded, report = normfuse.fold(as_path(model, x, path), example_inputs=x)
    assert len(report.applied) == 1, (report.entries, report.notes)
    assert mul_left(folded) == 0
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


@pytest.mark.parametrize("path", ["graphmodule", "exported"])
def test_frozen_norm_act_in_graph_folds(path):
    model = FROZEN_MODELS["minimal"]()
    x = image(2, 3, 16, 16)
    folded, report = normfuse.fold(as_path(model, x, path), example_inputs=x)
    assert len(report.applied) == 1, (report.entries, report.notes)
    assert mul_left(folded) == 0
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


@pytest.mark.parametrize("path", ["graphmodule", "exported"])
def test_non_channel_affine_after_conv_stays(path):
    """Guard: a mul/add that broadcasts along width, not channels, must never fold."""
    model = randomize(ConvThenAffine(per_channel=False), 19)
    x = image(2, 3, 16, 16)
    folded, report = normfuse.fold(as_path(model, x, path), example_inputs=x)
    assert not report.applied
    assert mul_left(folded) == 1
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


# ------------------------------------------------ 6. coverage: BatchNorm1d on flattened tokens


@pytest.mark.parametrize("path", ["module", "graphmodule", "exported"])
def test_bn1d_on_flattened_tokens_folds(path):
    model = randomize(LinearNorm(), 20)
    x = image(2, 7, 16)
    folded, report = normfuse.fold(as_path(model, x, path), example_inputs=x)
    assert len(report.applied) == 1, reasons(report)
    assert bn_left(folded) == 0
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


@pytest.mark.parametrize("path", ["module", "graphmodule", "exported"])
def test_bn1d_over_token_positions_stays(path):
    """Guard: after flatten(1) the BN channels are (token, feature) pairs: must not fold."""
    model = randomize(LinearNormByPosition(), 21)
    x = image(2, 7, 16)
    folded, report = normfuse.fold(as_path(model, x, path), example_inputs=x)
    assert not report.applied
    assert bn_left(folded) == 1
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


# -------------------------------------------- 7. branch-input BN and BN after concat: the reasons


def _folded_or_explained(report: Any, node: str, needed: str) -> None:
    """The norm ``node`` either folded, or is skipped with a reason matching ``needed``."""
    entry = next(e for e in report.entries if e.node == node)
    if entry.status != "applied":
        assert re.search(needed, entry.reason or "", re.I), entry.reason


@pytest.mark.parametrize("path", ["module", "exported"])
def test_identity_branch_block_folds_the_rest(path):
    model = randomize(RepVggBlock(), 22)
    x = image(2, 3, 12, 12)
    folded, report = normfuse.fold(as_path(model, x, path), example_inputs=x)
    applied = {e.node for e in report.applied}
    assert {"stem.bn", "conv_kxk.1", "conv_1x1.1"} <= applied
    assert {e.node for e in report.skipped} <= {"skip_bn"}
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


@pytest.mark.parametrize("path", ["module", "exported"])
def test_identity_branch_bn_folds_or_says_what_is_needed(path):
    model = randomize(RepVggBlock(), 23)
    x = image(2, 3, 12, 12)
    folded, report = normfuse.fold(as_path(model, x, path), example_inputs=x)
    _folded_or_explained(report, "skip_bn", r"branch|merg|re-?param")
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


@pytest.mark.parametrize("path", ["module", "exported"])
def test_bn_after_concat_result_is_right(path):
    model = randomize(ConcatNorm(), 24)
    x = image(2, 3, 12, 12)
    folded, report = normfuse.fold(as_path(model, x, path), example_inputs=x)
    assert [e.node for e in report.entries] == ["bn"]
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


@pytest.mark.parametrize("path", ["module", "exported"])
def test_bn_after_concat_folds_or_says_what_is_needed(path):
    model = randomize(ConcatNorm(), 25)
    x = image(2, 3, 12, 12)
    folded, report = normfuse.fold(as_path(model, x, path), example_inputs=x)
    _folded_or_explained(report, "bn", r"split|slice|per input|each input")
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


# ------------------------------------------------------------------------ timm, when installed


@pytest.fixture(scope="module")
def timm():
    t = import_timm()
    if t is None:
        pytest.skip("timm not installed (see tests/timm_shim.py)")
    return t


def _timm_minimal(timm: Any, frozen: bool) -> nn.Module:
    from timm.layers import BatchNormAct2d as TimmBNAct
    from timm.layers import freeze_batch_norm_2d

    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), TimmBNAct(8, act_layer=nn.ReLU)), 30)
    return freeze_batch_norm_2d(model).eval() if frozen else model


def test_timm_frozen_norm_act_fold_without_example_inputs(timm):
    model = _timm_minimal(timm, frozen=True)
    x = image(2, 3, 16, 16)
    folded, _ = normfuse.fold(model)
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


def test_timm_norm_act_swap_frozen_is_exact(timm):
    model = _timm_minimal(timm, frozen=False)
    x = image(2, 3, 16, 16)
    swapped, report = normfuse.swap(model, to="frozen")
    assert report.applied and all(e.exact for e in report.applied)
    out, ref = run(swapped, x), run(model, x)
    assert torch.equal(out, ref), f"max |diff| {float((out - ref).abs().max()):.3g}"


@pytest.mark.parametrize("name", ["mobilenetv3_small_050", "regnetx_002"])
def test_timm_norm_act_model_folds(timm, name):
    model = timm_model(timm, name, 31)
    x = image(1, 3, 32, 32)
    folded, report = normfuse.fold(model, example_inputs=x)
    assert report.applied, sorted(set(reasons(report).values()))[:3]
    assert bn_left(folded) == 0, reasons(report)
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


def test_timm_plain_conv_bn_model_folds(timm):
    """resnet10t uses plain BatchNorm2d: it folds completely today."""
    model = timm_model(timm, "resnet10t", 32)
    x = image(1, 3, 32, 32)
    folded, report = normfuse.fold(model, example_inputs=x)
    assert report.applied and not report.skipped, reasons(report)
    assert bn_left(folded) == 0
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


def test_timm_untraceable_model_folds(timm):
    model = timm_model(timm, "tf_efficientnet_lite0", 33)
    x = image(1, 3, 32, 32)
    folded, report = normfuse.fold(model, example_inputs=x)
    assert report.applied, (len(report.entries), report.notes)
    assert len(report.entries) == report.before.batchnorm_nodes
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


def test_timm_levit_token_bn_folds(timm):
    model = timm_model(timm, "levit_128s", 34, img_size=64)
    x = image(1, 3, 64, 64)
    folded, report = normfuse.fold(model, example_inputs=x)
    flat = [r for r in reasons(report).values() if "flatten" in r]
    assert not flat, flat[:3]
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


class SyncBatchNormAct2d(nn.SyncBatchNorm):
    """As timm's ``SyncBatchNormAct`` (``convert_sync_batchnorm`` of a BatchNormAct2d): SyncBN's
    own forward (input checks torch.fx cannot trace), then drop and act."""

    def __init__(self, num_features: int) -> None:
        super().__init__(num_features)
        self.drop = nn.Identity()
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(super().forward(x)))


@pytest.mark.parametrize("path", ["module", "exported"])
def test_sync_norm_act_folds_and_keeps_activation(path):
    model = randomize(nn.Sequential(nn.Conv2d(3, 8, 3), SyncBatchNormAct2d(8)), 40)
    x = image(2, 3, 12, 12)
    folded, report = normfuse.fold(as_path(model, x, path), example_inputs=x)
    assert len(report.applied) == 1, reasons(report)
    assert bn_left(folded) == 0
    if path == "module":
        assert has(folded, nn.ReLU)
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


@pytest.mark.parametrize("path", ["graphmodule", "exported"])
def test_affine_chain_with_sub_and_div_folds(path):
    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.register_buffer("scale", torch.ones(8))
            self.register_buffer("shift", torch.zeros(8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = (self.conv(x) - self.shift.view(1, -1, 1, 1)) / (self.scale.view(-1, 1, 1) + 2.0)
            return torch.relu(2.0 - y)

    model = randomize(Chain(), 41)
    x = image(2, 3, 12, 12)
    folded, report = normfuse.fold(as_path(model, x, path), example_inputs=x)
    assert len(report.applied) == 1, (report.entries, report.notes)
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


@pytest.mark.parametrize("path", ["graphmodule", "exported"])
def test_affine_chain_by_a_non_constant_or_dtype_changing_tensor_stays(path):
    class Chain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.register_buffer("scale", torch.ones(8, dtype=torch.float64))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.conv(x)
            return y * x.mean() + (y * self.scale.view(1, -1, 1, 1)).float()

    model = randomize(Chain(), 42)
    x = image(2, 3, 12, 12)
    folded, report = normfuse.fold(as_path(model, x, path), example_inputs=x)
    assert not report.applied
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


class NormLinear(nn.Module):
    """As LeViT's head (``NormLinear``): BatchNorm1d, dropout, Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.1)
        self.linear = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.drop(self.bn(x.mean(1))))


@pytest.mark.parametrize("path", ["module", "graphmodule", "exported"])
def test_bn_before_linear_through_eval_dropout(path):
    """An eval dropout, op or module (no hooks), returns its input and nothing else reads it:
    the BN folds into the Linear after it on every path (the module paths refused it)."""
    model = randomize(NormLinear(), 43)
    x = image(2, 7, 16)
    folded, report = normfuse.fold(as_path(model, x, path), example_inputs=x)
    assert len(report.applied) == 1, reasons(report)
    assert bn_left(folded) == 0
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL


class _PreNormBlock(nn.Module):
    """coatnet/maxvit's pre-norm: ``BatchNormAct2d(apply_act=False)`` (drop and act are
    ``nn.Identity``) after an add, before a 1x1 conv. Its tail changes nothing, so it folds into
    the conv after it (it was refused: "its forward runs drop, act after the norm")."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.pre_norm = BatchNormAct2d(c, act=None)
        self.conv = nn.Conv2d(c, c, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + x.relu()
        return x + self.conv(self.pre_norm(x))


def test_a_norm_act_whose_tail_is_identity_folds_into_the_next_conv():
    """(A GraphModule that torch.fx traced into the norm-act calls its Identity modules on
    their own: those stay, and the norm with them, as for any module between.)"""
    model = randomize(_PreNormBlock(), 12).eval()
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x)
        folded, report = normfuse.fold(model, example_inputs=(x,))  # the default check
        err = ((folded(x) - ref).abs().max() / ref.abs().max()).item()
    assert [(e.node, e.direction) for e in report.applied] == [("pre_norm", "before")]
    assert err < 1e-5


class _ConcatThenPointwise(nn.Module):
    """inception_next's mixer: a channel concat, a BN, then a 1x1 conv straight after it."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.left, self.right = nn.Conv2d(3, c, 3, padding=1), nn.Conv2d(3, c, 1)
        self.bn, self.fc1 = nn.BatchNorm2d(2 * c), nn.Conv2d(2 * c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc1(self.bn(torch.cat([self.left(x), self.right(x)], 1)))


@pytest.mark.parametrize("path", ["module", "exported"])
def test_bn_after_concat_folds_into_the_conv_after_it(path):
    """The concat needs no split when the BN goes forward into the 1x1 conv (it was refused
    with "would need splitting per concatenated input")."""
    model = randomize(_ConcatThenPointwise(), 26)
    x = image(2, 3, 12, 12)
    folded, report = normfuse.fold(as_path(model, x, path), example_inputs=x)
    assert [(e.node, e.direction) for e in report.applied] == [("bn", "before")]
    assert rel_err(run(folded, x), ref64(model, x)) <= TOL
