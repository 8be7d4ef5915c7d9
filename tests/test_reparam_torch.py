"""Structural reparameterization of PyTorch models: ``normfuse.fold(model, reparam=True)``.

Every block is built in plain torch with random weights and random non-trivial BatchNorm
statistics (mean, variance far from 1, gamma, beta), in eval mode. A merge must leave one op
where the branches were and compute the same function (max error <= 1e-5 of the output's max
in float32, and the fold's own float64 check passes); a refusal must leave the branches and
say why. timm's train-form models are compared with timm's own ``reparameterize_model`` when
timm is installed.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

import normfuse


def bn(c: int, gen: torch.Generator, dims: int = 2) -> nn.Module:
    m = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d}[dims](c)
    with torch.no_grad():
        m.running_mean.copy_(torch.randn(c, generator=gen) * 0.5)
        m.running_var.copy_(torch.rand(c, generator=gen) * 2 + 0.3)
        m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
        m.bias.copy_(torch.randn(c, generator=gen) * 0.5)
    return m


def conv_bn(cin, cout, k, gen, stride=1, padding=None, groups=1, dilation=1, bias=False):
    if padding is None:
        padding = tuple(dilation * (s - 1) // 2 for s in ((k, k) if isinstance(k, int) else k))
    conv = nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias=bias)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=gen) * 0.3)
    return nn.Sequential(conv, bn(cout, gen))


class Sum(nn.Module):
    """``sum(branch(x))`` (+ x), then an optional activation."""

    def __init__(self, *branches: nn.Module, identity: bool = False, act: bool = True) -> None:
        super().__init__()
        self.branches = nn.ModuleList(branches)
        self.identity = identity
        self.act = nn.ReLU() if act else nn.Identity()

    def forward(self, x):
        y = self.branches[0](x)
        for b in self.branches[1:]:
            y = y + b(x)
        if self.identity:
            y = y + x
        return self.act(y)


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def convs(model) -> int:
    """Convolution calls in the model's graph (modules, functional and ATen calls)."""
    if isinstance(model, torch.export.ExportedProgram):
        return sum("conv" in str(n.target) for n in model.graph.nodes if n.op == "call_function")
    return sum(isinstance(m, nn.modules.conv._ConvNd) for m in model.modules())


def merged(model, x, **kw):
    """Fold with reparam; the result, the reparam entries, and its max error relative to the
    output's max (float32)."""
    out, report = normfuse.fold(model, example_inputs=x, reparam=True, **kw)
    with torch.no_grad():
        ref = model(x) if isinstance(model, nn.Module) else model.module()(x)
        got = out(x) if isinstance(out, nn.Module) else out.module()(x)
    err = float((got - ref).abs().max() / ref.abs().max())
    return out, blocks(report.entries), err, report


def blocks(entries):
    """The reparam pass's own entries (not the norms it merged, also marked ``reparam``)."""
    return [e for e in entries if e.direction == "reparam" and "norm" not in e.op_type.lower()]


# --------------------------------------------------------------------- each branch shape
SHAPES = {
    "3x3 + 1x1": lambda g: [conv_bn(6, 6, 3, g), conv_bn(6, 6, 1, g)],
    "3x3 + 1x3 + 3x1 (ACNet)": lambda g: [
        conv_bn(6, 6, 3, g),
        conv_bn(6, 6, (1, 3), g),
        conv_bn(6, 6, (3, 1), g),
    ],
    "3x3 + 1x1 + identity BN": lambda g: [conv_bn(6, 6, 3, g), conv_bn(6, 6, 1, g), bn(6, g)],
    "5x5 + 3x3 + 1x1, bias": lambda g: [
        conv_bn(6, 6, 5, g, bias=True),
        conv_bn(6, 6, 3, g, bias=True),
        conv_bn(6, 6, 1, g),
    ],
    "depthwise 3x3 x2 + 1x1 + identity BN (MobileOne)": lambda g: [
        conv_bn(6, 6, 3, g, groups=6),
        conv_bn(6, 6, 3, g, groups=6),
        conv_bn(6, 6, 1, g, groups=6),
        bn(6, g),
    ],
    "grouped 3x3 + 1x1 + identity BN": lambda g: [
        conv_bn(6, 6, 3, g, groups=2),
        conv_bn(6, 6, 1, g, groups=2),
        bn(6, g),
    ],
    "stride 2: 3x3 + 1x1": lambda g: [conv_bn(6, 8, 3, g, stride=2), conv_bn(6, 8, 1, g, stride=2)],
    "dilated 3x3 + 1x1": lambda g: [conv_bn(6, 6, 3, g, dilation=2), conv_bn(6, 6, 1, g)],
}


@pytest.mark.parametrize("name", list(SHAPES))
def test_branch_shapes_merge_into_one_conv(name):
    g = gen(1)
    model = Sum(*SHAPES[name](g)).eval()
    x = torch.randn(2, 6, 9, 8, generator=g)
    assert convs(model) >= 2
    out, entries, err, report = merged(model, x)
    assert convs(out) == 1, name
    assert err <= 1e-5
    (entry,) = entries
    assert entry.status == "applied" and entry.target.startswith("Conv2d")
    assert entry.target.count("+") == len(model.branches) - 1
    assert report.parity is not None and report.parity.passed
    # the identity BN skipped by the BN fold is covered by the merge now
    assert all(e.status == "applied" for e in report.entries), report.entries


def test_asymmetric_window_is_padded_before_the_merged_conv():
    """4x4 'same' (pads 1, 2) + 3x3 (pads 1, 1): a 4x4 window with pads (1, 2), as F.pad."""
    g = gen(2)
    a = nn.Conv2d(6, 6, 4, padding="same")
    model = Sum(nn.Sequential(a, bn(6, g)), conv_bn(6, 6, 3, g)).eval()
    x = torch.randn(1, 6, 7, 9, generator=g)
    out, _entries, err, _ = merged(model, x)
    assert convs(out) == 1 and err <= 1e-5
    assert any(n.target is F.pad for n in out.graph.nodes)


def test_identity_without_bn_and_a_constant_term():
    g = gen(3)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(6, 6, 3, g), conv_bn(6, 6, 1, g)

        def forward(self, x):
            return 0.5 + self.a(x) - self.b(x) + x

    model = Block().eval()
    x = torch.randn(2, 6, 8, 8, generator=g)
    out, entries, err, _ = merged(model, x)
    assert convs(out) == 1 and err <= 1e-5
    assert "identity" in entries[-1].target


def test_repmixer_scaled_difference_merges():
    """FastViT's RepMixer: x + gamma * (mixer(x) - norm(x)), gamma per channel."""
    g = gen(4)

    class RepMixer(nn.Module):
        def __init__(self):
            super().__init__()
            self.mixer = conv_bn(6, 6, 3, g, groups=6)
            self.mix_id = bn(6, g)
            self.norm = bn(6, g)
            self.gamma = nn.Parameter(torch.rand(6, generator=g) + 0.5)

        def forward(self, x):
            mixed = self.mixer(x) + self.mix_id(x)
            return x + self.gamma.view(1, -1, 1, 1) * (mixed - self.norm(x))

    model = RepMixer().eval()
    x = torch.randn(2, 6, 8, 8, generator=g)
    out, entries, err, _ = merged(model, x)
    assert convs(out) == 1 and err <= 1e-5
    assert [e.status for e in entries] == ["applied"]


def test_bn_after_the_sum_folds_into_the_merged_conv():
    """RepViT's RepVggDw: bn(conv(x) + conv1(x) + x)."""
    g = gen(5)

    class RepVggDw(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = conv_bn(6, 6, 3, g, groups=6)
            self.conv1 = nn.Conv2d(6, 6, 1, groups=6)
            self.bn = bn(6, g)

        def forward(self, x):
            return self.bn(self.conv(x) + self.conv1(x) + x)

    model = RepVggDw().eval()
    x = torch.randn(2, 6, 8, 8, generator=g)
    out, entries, err, _ = merged(model, x)
    assert convs(out) == 1 and err <= 1e-5
    assert not any(isinstance(m, nn.BatchNorm2d) for m in out.modules())
    assert "after the sum" in entries[0].warnings[-1]


def test_linear_branches_and_a_distilled_head():
    g = gen(6)

    class Head(nn.Module):
        def __init__(self):
            super().__init__()
            self.bn1, self.l1 = bn(8, g, 1), nn.Linear(8, 5)
            self.bn2, self.l2 = bn(8, g, 1), nn.Linear(8, 5)

        def forward(self, x):
            return (self.l1(self.bn1(x)) + self.l2(self.bn2(x))) / 2

    model = Head().eval()
    x = torch.randn(4, 8, generator=g)
    out, entries, err, _ = merged(model, x)
    assert sum(isinstance(m, nn.Linear) for m in out.modules()) == 1
    assert err <= 1e-5 and entries[0].status == "applied"

    class Square(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)

        def forward(self, x):
            return self.a(x) + x + self.b(x)

    out, entries, err, _ = merged(Square().eval(), x)
    assert sum(isinstance(m, nn.Linear) for m in out.modules()) == 1 and err <= 1e-5


def test_avgpool_branch_merges_when_it_counts_its_padding():
    g = gen(7)
    x = torch.randn(2, 6, 8, 8, generator=g)
    model = Sum(conv_bn(6, 6, 3, g), nn.Sequential(nn.AvgPool2d(3, 1, 1), bn(6, g))).eval()
    out, entries, err, _ = merged(model, x)
    assert convs(out) == 1 and err <= 1e-5
    assert "avgpool 3x3" in entries[0].target
    model = Sum(conv_bn(6, 6, 3, g), nn.AvgPool2d(3, 1, 1, count_include_pad=False)).eval()
    out, entries, err, _ = merged(model, x)
    assert any(isinstance(m, nn.AvgPool2d) for m in out.modules())
    assert entries[0].status == "skipped" and "count_include_pad=False" in entries[0].reason


def test_dbb_style_1x1_then_kxk_sequence():
    """1x1 -> BN -> 3x3 without padding merges; with padding and a BN shift it is refused."""
    g = gen(8)
    x = torch.randn(2, 6, 9, 9, generator=g)
    exact = nn.Sequential(conv_bn(6, 6, 1, g), conv_bn(6, 6, 3, g, padding=0)).eval()
    out, entries, err, _ = merged(exact, x)
    assert convs(out) == 1 and err <= 1e-5
    assert entries[0].status == "applied" and "1x1->3x3" in entries[0].target
    border = nn.Sequential(conv_bn(6, 6, 1, g), conv_bn(6, 6, 3, g)).eval()
    out, entries, err, _ = merged(border, x)
    assert convs(out) == 2
    assert entries[0].status == "skipped" and "borders" in entries[0].reason


# ------------------------------------------------------------------------------ refusals
def test_dilation_mismatch_is_refused():
    g = gen(9)
    model = Sum(conv_bn(6, 6, 3, g), conv_bn(6, 6, 3, g, dilation=2)).eval()
    out, entries, _err, _ = merged(model, torch.randn(1, 6, 8, 8, generator=g))
    assert convs(out) == 2
    assert entries[0].status == "skipped" and "dilation mismatch" in entries[0].reason


def test_stride_mismatch_is_refused():
    g = gen(10)
    model = Sum(conv_bn(6, 6, 3, g, stride=2), conv_bn(6, 6, 1, g)).eval()
    out, entries, _, _ = merged(model, torch.randn(1, 6, 1, 1, generator=g))
    assert convs(out) == 2
    assert entries[0].status == "skipped" and "stride mismatch" in entries[0].reason


def test_misaligned_padding_is_refused():
    """Dilation 2: a 3x3 with pads 2 and a 2x2 with pads 1 give the same output size, but the
    taps of one fall between the other's."""
    g = gen(11)
    model = Sum(conv_bn(6, 6, 3, g, dilation=2), conv_bn(6, 6, 2, g, dilation=2, padding=1)).eval()
    out, entries, _, _ = merged(model, torch.randn(1, 6, 8, 8, generator=g))
    assert convs(out) == 2
    assert entries[0].status == "skipped" and "padding misaligned" in entries[0].reason


def test_branch_output_used_elsewhere_is_refused():
    g = gen(12)

    class Shared(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(6, 6, 3, g), nn.Conv2d(6, 6, 1)

        def forward(self, x):
            side = self.b(x)
            return self.a(x) + side, side * 2

    model = Shared().eval()
    x = torch.randn(1, 6, 8, 8, generator=g)
    out, report = normfuse.fold(model, example_inputs=x, reparam=True)
    entries = blocks(report.entries)
    assert convs(out) == 2 and type(out) is Shared
    assert entries[0].status == "skipped" and "used elsewhere" in entries[0].reason


def test_nonlinearity_between_is_refused():
    g = gen(13)
    model = Sum(conv_bn(6, 6, 3, g), nn.Sequential(conv_bn(6, 6, 1, g), nn.ReLU())).eval()
    x = torch.randn(1, 6, 8, 8, generator=g)
    out, entries, _err, _report = merged(model, x)
    assert convs(out) == 2 and type(out) is Sum  # nothing merged: the class stays
    assert entries[0].status == "skipped" and "nonlinearity between" in entries[0].reason
    assert "ReLU" in entries[0].reason


# -------------------------------------------------------------------------- input kinds
def repvgg(g: torch.Generator) -> nn.Module:
    stages = []
    for cin, cout, stride in ((3, 8, 2), (8, 8, 1), (8, 16, 2), (16, 16, 1)):
        branches = [
            conv_bn(cin, cout, 3, g, stride=stride),
            conv_bn(cin, cout, 1, g, stride=stride),
        ]
        stages.append(Sum(*branches, bn(cin, g)) if cin == cout and stride == 1 else Sum(*branches))
    return nn.Sequential(*stages, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


@pytest.mark.parametrize("kind", ["module", "graphmodule", "exported"])
def test_repvgg_style_network_each_input_kind(kind):
    g = gen(14)
    model = repvgg(g)
    x = torch.randn(1, 3, 12, 12, generator=g)
    src = {
        "module": model,
        "graphmodule": fx.symbolic_trace(model),
        "exported": torch.export.export(model, (x,)),
    }[kind]
    before = convs(src)
    out, entries, err, report = merged(src, x)
    assert before == 8 and convs(out) == 4
    assert err <= 1e-5
    assert [e.status for e in entries] == ["applied"] * 4
    assert report.parity.passed
    if kind == "module":  # merged inside its blocks, each now a GraphModule: the class stays
        assert type(out) is nn.Sequential
        assert all(isinstance(out[i], fx.GraphModule) for i in range(4))
        assert any("keeps its class Sequential" in n for n in report.notes)
    if kind == "exported":
        assert isinstance(out, torch.export.ExportedProgram)


def test_mobileone_style_network():
    """k parallel depthwise 3x3 + 1x1 scale + identity BN, ReLU, then the same pointwise."""
    g = gen(15)

    def mobileone(c, k, groups, size):
        convs_ = [conv_bn(c, c, size, g, groups=groups) for _ in range(k)]
        scale = [conv_bn(c, c, 1, g, groups=groups)] if size > 1 else []
        return Sum(*convs_, *scale, bn(c, g))

    model = nn.Sequential(
        mobileone(8, 3, 8, 3), mobileone(8, 3, 1, 1), mobileone(8, 2, 8, 3), mobileone(8, 2, 1, 1)
    ).eval()
    x = torch.randn(1, 8, 10, 10, generator=g)
    out, _entries, err, report = merged(model, x)
    assert convs(model) == 12 and convs(out) == 4 and err <= 1e-5
    assert report.parity.passed


def test_folding_twice_changes_nothing():
    g = gen(16)
    model = repvgg(g)
    x = torch.randn(1, 3, 12, 12, generator=g)
    once, _ = normfuse.fold(model, example_inputs=x, reparam=True, check=False)
    twice, report = normfuse.fold(once, example_inputs=x, reparam=True, check=False)
    assert convs(twice) == convs(once)
    assert not [e for e in report.entries if e.direction == "reparam"]


# ------------------------------------------------------------------------------- timm
# about 5-20 s each on two shared cores (the BN folds of hundreds of timm norm modules):
# two by default, all six with NORMFUSE_TIMM=all (benchmarks/reparam.py measures all six)
TIMM = ["repvgg_a0", "repghostnet_050"]
if os.environ.get("NORMFUSE_TIMM") == "all":
    TIMM += ["repvgg_b0", "mobileone_s0", "fastvit_t8", "repvit_m1"]


def conv_calls(model: nn.Module) -> int:
    traced = model if isinstance(model, fx.GraphModule) else fx.symbolic_trace(model)
    mods = dict(traced.named_modules())
    return sum(
        (n.op == "call_module" and isinstance(mods[n.target], nn.modules.conv._ConvNd))
        or (n.op == "call_function" and "conv" in getattr(n.target, "__name__", ""))
        for n in traced.graph.nodes
    )


@pytest.mark.parametrize("name", TIMM)
def test_timm_train_forms_match_reparameterize_model(name):
    from tests.timm_shim import import_timm

    import_timm()  # the shim first: timm's torchvision import fails without it
    timm = pytest.importorskip("timm")
    from timm.utils.model import reparameterize_model

    from benchmarks.reparam import randomise_bn

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    randomise_bn(model, 1)
    x = torch.randn(1, 3, 64, 64, generator=gen(2))
    out, _report = normfuse.fold(model, example_inputs=x, reparam=True, check=False)
    deploy = reparameterize_model(copy.deepcopy(model)).eval()
    with torch.no_grad():
        ref64 = copy.deepcopy(model).double()(x.double())
        err = float((out(x).double() - ref64).abs().max() / ref64.abs().max())
        own = float((model(x).double() - ref64).abs().max() / ref64.abs().max())
    assert conv_calls(out) == conv_calls(deploy)
    assert err <= max(1e-5, 2 * own)


def test_a_scale_that_is_not_per_channel_is_refused():
    """A branch times a (1, 1, H, W) mask is no convolution: the block stays."""
    g = gen(17)

    class Masked(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = conv_bn(6, 6, 3, g), conv_bn(6, 6, 1, g)
            self.register_buffer("mask", torch.rand(1, 1, 8, 8, generator=g))

        def forward(self, x):
            return self.a(x) + self.b(x) * self.mask

    model = Masked().eval()
    out, entries, err, _ = merged(model, torch.randn(1, 6, 8, 8, generator=g))
    assert convs(out) == 2 and err <= 1e-5
    assert entries[0].status == "skipped" and "not per-channel" in entries[0].reason


def test_functional_convs_in_a_graphmodule():
    """F.conv2d with the module's own parameters (no nn.Conv2d), traced: merged all the same."""
    g = gen(18)

    class Functional(nn.Module):
        def __init__(self):
            super().__init__()
            self.w3 = nn.Parameter(torch.randn(6, 6, 3, 3, generator=g) * 0.3)
            self.w1 = nn.Parameter(torch.randn(6, 6, 1, 1, generator=g) * 0.3)
            self.b1 = nn.Parameter(torch.randn(6, generator=g))
            self.bn = bn(6, g)

        def forward(self, x):
            return F.conv2d(x, self.w3, None, 1, 1) + F.conv2d(x, self.w1, self.b1) + self.bn(x)

    model = Functional().eval()
    x = torch.randn(1, 6, 8, 8, generator=g)
    out, entries, err, report = merged(fx.symbolic_trace(model), x)
    assert convs(out) == 1 and err <= 1e-5 and report.parity.passed
    assert entries[0].target.endswith("(3x3 + 1x1 + identity BatchNorm2d)")


def test_untraceable_module_is_merged_through_torch_export():
    """torch.fx cannot trace a branch on the input's shape; torch.export can: a block in the
    model's own forward is merged in the exported module's graph, and the result says so."""
    g = gen(19)

    class ShapeBranch(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b, self.bn = conv_bn(6, 6, 3, g), conv_bn(6, 6, 1, g), bn(6, g)

        def forward(self, x):
            if x.shape[-1] > 4:
                x = x * 2
            return self.a(x) + self.b(x) + self.bn(x)

    model = ShapeBranch().eval()
    x = torch.randn(1, 6, 8, 8, generator=g)
    with pytest.raises(fx.proxy.TraceError):
        fx.symbolic_trace(model)
    out, entries, err, report = merged(model, x)
    assert convs(out) == 1 and err <= 1e-5 and report.parity.passed
    assert isinstance(out, fx.GraphModule) and entries[0].status == "applied"
    assert any("torch.export GraphModule" in n for n in report.notes)


def test_submodule_blocks_keep_the_model_class_and_its_methods():
    """Blocks inside submodules: each such submodule becomes its merged GraphModule; the model
    stays an instance of its class (its other methods and attributes too)."""
    g = gen(20)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 3, padding=1)
            self.block = Sum(conv_bn(6, 6, 3, g), conv_bn(6, 6, 1, g), bn(6, g))
            self.label = "mine"

        def forward(self, x):
            return self.block(self.stem(x))

        def describe(self):
            return self.label

    model = Net().eval()
    x = torch.randn(1, 3, 8, 8, generator=g)
    out, entries, err, report = merged(model, x)
    assert type(out) is Net and out.describe() == "mine"
    assert isinstance(out.block, fx.GraphModule) and convs(out) == 2
    assert err <= 1e-5 and report.parity.passed
    assert [e.node for e in entries] == ["block"]


class InPlaceSum(nn.Module):
    """timm's RepVggBlock: ``x = conv_1x1(x) + conv_kxk(x); x += identity(x)``."""

    def __init__(self, g: torch.Generator, c: int = 6) -> None:
        super().__init__()
        self.kxk, self.pw, self.identity = conv_bn(c, c, 3, g), conv_bn(c, c, 1, g), bn(c, g)

    def forward(self, x):
        y = self.pw(x) + self.kxk(x)
        y += self.identity(x)
        return y.relu()


def test_an_in_place_sum_merges_in_an_exported_program():
    """torch.export keeps ``x += identity`` as ``aten.add_``, which was no sum: the identity
    BN stayed ("one of 4 branches that are summed") and two convs with it."""
    g = gen(31)
    model = InPlaceSum(g).eval()
    x = torch.randn(1, 6, 10, 10, generator=g)
    out, entries, err, report = merged(torch.export.export(model, (x,)), x)
    assert convs(out) == 1 and err <= 1e-5
    assert not [n for n in out.graph.nodes if "batch_norm" in str(n.target)]
    assert [e.status for e in entries] == ["applied"] and report.parity.passed


def test_a_merged_submodule_keeps_the_attributes_its_parent_reads():
    """ultralytics' BaseModel reads ``m.f`` and ``m.i`` of each layer in its forward: the
    merged GraphModule that replaced a RepC3 lacked them (AttributeError from the check)."""
    g = gen(21)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList(
                [nn.Conv2d(3, 6, 3, padding=1), Sum(conv_bn(6, 6, 3, g), conv_bn(6, 6, 1, g))]
            )
            for i, m in enumerate(self.layers):
                m.f, m.i = -1, i

        def forward(self, x):
            for m in self.layers:
                assert m.f == -1
                x = m(x)
            return x

    model = Net().eval()
    x = torch.randn(1, 3, 8, 8, generator=g)
    out, entries, err, report = merged(model, x)  # the default check ran the model
    assert isinstance(out.layers[1], fx.GraphModule) and (out.layers[1].f, out.layers[1].i) == (
        -1,
        1,
    )
    assert err <= 1e-5 and report.parity.passed and len(entries) == 1
