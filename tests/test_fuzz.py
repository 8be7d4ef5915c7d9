"""Fuzzing: random valid graphs fold correctly; mutated models get exit 0 or 2, never a crash.

The CI profile runs a small budget; ``NORMFUSE_FUZZ=long pytest tests/test_fuzz.py`` runs a
long one.
"""

from __future__ import annotations

import os
import random

import numpy as np
import onnx
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto as TP
from onnx import helper

import normfuse
from normfuse.cli import cli
from tests.conftest import bn_params, make_model, run, tensor

LONG = os.environ.get("NORMFUSE_FUZZ") == "long"
GRAPHS = settings(
    max_examples=2000 if LONG else 60, deadline=None, suppress_health_check=list(HealthCheck)
)
MUTANTS = settings(
    max_examples=3000 if LONG else 80, deadline=None, suppress_health_check=list(HealthCheck)
)


class Builder:
    """Grows a valid graph op by op, tracking the current tensor's shape."""

    def __init__(self, rng: np.random.Generator, shape: list[int], constant_nodes: bool) -> None:
        self.rng, self.shape, self.constant_nodes = rng, shape, constant_nodes
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.cur, self.n = "x", 0

    def name(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def const(self, base: str, array: np.ndarray) -> str:
        name = self.name(base)
        if self.constant_nodes and self.rng.random() < 0.5:
            self.nodes.append(helper.make_node("Constant", [], [name], value=tensor(name, array)))
        else:
            self.inits.append(tensor(name, array))
        return name

    def emit(self, op: str, inputs: list[str], **attrs) -> None:
        out = self.name("t")
        self.nodes.append(
            helper.make_node(op, [self.cur, *inputs], [out], name=self.name(op.lower()), **attrs)
        )
        self.cur = out

    def conv(
        self, transpose: bool, k: int, stride: int, dilation: int, pad: int, bias: bool, groups: int
    ) -> None:
        c = self.shape[1]
        groups = groups if c % groups == 0 else 1
        cout = groups * int(self.rng.integers(1, 4))
        spatial = len(self.shape) - 2
        span = dilation * (k - 1) + 1
        if transpose:
            dims = [(s - 1) * stride - 2 * pad + span for s in self.shape[2:]]
        else:
            dims = [(s + 2 * pad - span) // stride + 1 for s in self.shape[2:]]
        if min(dims) < 1 or max(dims) > 64:
            return  # not a valid (or sensible) layer here
        wshape = [c, cout // groups] if transpose else [cout, c // groups]
        w = self.rng.standard_normal(wshape + [k] * spatial).astype(np.float32) * 0.3
        inputs = [self.const("w", w)]
        if bias:
            inputs.append(self.const("b", self.rng.standard_normal(cout).astype(np.float32)))
        self.emit(
            "ConvTranspose" if transpose else "Conv",
            inputs,
            group=groups,
            strides=[stride] * spatial,
            dilations=[dilation] * spatial,
            pads=[pad] * 2 * spatial,
        )
        self.shape = [self.shape[0], cout, *dims]

    def dense(self, gemm: bool, out: int) -> None:
        f = self.shape[-1]
        if gemm and len(self.shape) == 2:
            trans = int(self.rng.integers(0, 2))
            w = self.rng.standard_normal([out, f] if trans else [f, out]).astype(np.float32) * 0.3
            self.emit(
                "Gemm", [self.const("w", w)], transB=trans, alpha=float(self.rng.uniform(0.5, 1.5))
            )
        else:
            self.emit(
                "MatMul",
                [self.const("w", self.rng.standard_normal([f, out]).astype(np.float32) * 0.3)],
            )
        self.shape = [*self.shape[:-1], out]

    def bn(self, training: bool) -> None:
        c = self.shape[1]
        names = []
        for t in bn_params(self.rng, c, prefix=self.name("bn")):
            names.append(self.const("p", onnx.numpy_helper.to_array(t)))
        attrs = {"training_mode": 1} if training else {}
        out = self.name("t")
        outputs = [out, self.name("rm"), self.name("rv")] if training else [out]
        self.nodes.append(
            helper.make_node(
                "BatchNormalization", [self.cur, *names], outputs, name=self.name("bn"), **attrs
            )
        )
        self.cur = out

    def elementwise(self, op: str, axis_kind: str) -> None:
        rank, c = len(self.shape), self.shape[1]
        shape = {
            "channel": [c] + [1] * (rank - 2),
            "full_channel": [1, c] + [1] * (rank - 2),
            "scalar": [],
            "last": [self.shape[-1]],
        }[axis_kind]
        value = self.rng.uniform(0.5, 2.0, shape).astype(np.float32)
        self.emit(op, [self.const("k", value)])


@st.composite
def graphs(draw):
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    rank = draw(st.sampled_from([2, 3, 4]))
    shape = {2: [2, 6], 3: [2, 4, 6], 4: [2, 4, 7, 6]}[rank]
    b = Builder(rng, list(shape), draw(st.booleans()))
    for _ in range(draw(st.integers(2, 7))):
        kind = draw(
            st.sampled_from(
                ["conv", "convT", "dense", "gemm", "bn", "bn", "bn", "mul", "add", "relu"]
            )
        )
        if kind in ("conv", "convT") and len(b.shape) == 4:
            b.conv(
                kind == "convT",
                draw(st.integers(1, 3)),
                draw(st.integers(1, 2)),
                draw(st.integers(1, 2)),
                draw(st.integers(0, 1)),
                draw(st.booleans()),
                draw(st.sampled_from([1, 2])),
            )
        elif kind in ("dense", "gemm"):
            b.dense(kind == "gemm", draw(st.integers(2, 6)))
        elif kind == "bn":
            b.bn(training=draw(st.integers(0, 9)) == 0)
        elif kind in ("mul", "add"):
            b.elementwise(
                kind.capitalize(),
                draw(st.sampled_from(["channel", "full_channel", "scalar", "last"])),
            )
        elif kind == "relu":
            b.emit("Relu", [])
    b.nodes.append(helper.make_node("Identity", [b.cur], ["y"]))
    model = make_model(
        b.nodes, [("x", TP.FLOAT, list(shape))], [("y", TP.FLOAT, None)], b.inits, opset=17
    )
    return model, rng.standard_normal(shape).astype(np.float32)


def _intermediates(model: onnx.ModelProto, x: np.ndarray) -> list[np.ndarray]:
    import onnxruntime as ort

    from normfuse.runtime.bisect import expose_all

    data, _, _ = expose_all(model.SerializeToString())
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])
    return [
        np.asarray(v, np.float64) for v in sess.run(None, {"x": x}) if isinstance(v, np.ndarray)
    ]


@GRAPHS
@given(graphs())
def test_random_graphs_fold_exactly_and_idempotently(case):
    model, x = case
    onnx.checker.check_model(model, full_check=True)
    folded, report = normfuse.fold(model, check=False)
    onnx.checker.check_model(folded, full_check=True)
    ref, got = (
        run(model, {"x": x})[0].astype(np.float64),
        run(folded, {"x": x})[0].astype(np.float64),
    )
    # float32 rounding scales with the magnitudes summed along the way, not with the output
    # alone (outputs can be tiny after cancellation): the floor is the largest intermediate
    scale = max(float(np.abs(v).max()) for v in _intermediates(model, x) if v.size)
    assert np.abs(ref - got).max() <= 1e-5 * np.abs(ref).max() + 1e-6 * scale
    left = [n for n in folded.graph.node if n.op_type == "BatchNormalization"]
    skipped_bn = [e for e in report.skipped if e.op_type == "BatchNormalization"]
    assert len(skipped_bn) == len(left) and all(e.reason for e in skipped_bn)
    again, second = normfuse.fold(folded, check=False)
    assert again.SerializeToString() == folded.SerializeToString()
    assert second.applied == []


# ---------------------------------------------------------------- mutated models through the CLI
def _base_model() -> onnx.ModelProto:
    rng = np.random.default_rng(7)
    b = Builder(rng, [1, 4, 6, 6], constant_nodes=True)
    b.conv(False, 3, 1, 1, 1, True, 2)
    b.bn(False)
    b.emit("Relu", [])
    b.elementwise("Mul", "channel")
    b.conv(False, 1, 1, 1, 0, False, 1)
    b.nodes.append(helper.make_node("Identity", [b.cur], ["y"]))
    return make_model(
        b.nodes, [("x", TP.FLOAT, [1, 4, 6, 6])], [("y", TP.FLOAT, None)], b.inits, opset=17
    )


BASE = _base_model()


def _mutate_once(model: onnx.ModelProto, r: random.Random) -> bytes:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    what = r.choice(
        [
            "attr",
            "drop_input",
            "shape",
            "dtype",
            "drop_init",
            "rename",
            "bytes",
            "truncate",
            "opset",
            "dup_output",
        ]
    )
    nodes = list(m.graph.node)
    if what == "attr":
        node = r.choice(nodes)
        if node.attribute:
            a = r.choice(list(node.attribute))
            if a.type == onnx.AttributeProto.INT:
                a.i = r.choice([-1, 0, 1, 2, 3, 1 << 40])
            elif a.type == onnx.AttributeProto.INTS and a.ints:
                a.ints[r.randrange(len(a.ints))] = r.choice([-1, 0, 2, 5])
            elif a.type == onnx.AttributeProto.FLOAT:
                a.f = r.choice([-1.0, 0.0, float("nan"), 1e30])
    elif what == "drop_input":
        node = r.choice(nodes)
        if node.input:
            del node.input[r.randrange(len(node.input))]
    elif what == "shape":
        dims = m.graph.input[0].type.tensor_type.shape.dim
        dims[r.randrange(len(dims))].dim_value = r.choice([0, 1, 2, 3, 9])
    elif what == "dtype":
        t = r.choice(list(m.graph.initializer)) if m.graph.initializer else None
        if t is not None:
            t.data_type = r.choice([TP.FLOAT16, TP.INT64, TP.DOUBLE, TP.STRING])
    elif what == "drop_init" and m.graph.initializer:
        del m.graph.initializer[r.randrange(len(m.graph.initializer))]
    elif what == "rename":
        node = r.choice(nodes)
        if node.input:
            node.input[r.randrange(len(node.input))] = "nowhere"
    elif what == "opset":
        m.opset_import[0].version = r.choice([1, 6, 7, 30])
    elif what == "dup_output":
        m.graph.output.append(m.graph.output[0])
    data = m.SerializeToString()
    if what == "bytes":
        data = bytearray(data)
        for _ in range(r.randint(1, 8)):
            data[r.randrange(len(data))] = r.randrange(256)
        data = bytes(data)
    elif what == "truncate":
        data = data[: r.randrange(len(data))]
    return data


def _mutate(model: onnx.ModelProto, r: random.Random) -> bytes:
    """A mutant that really differs from ``model`` (some draws change nothing: draw again)."""
    base = model.SerializeToString()
    for _ in range(20):
        data = _mutate_once(model, r)
        if data != base:
            return data
    return base[: len(base) // 2]


@MUTANTS
@given(st.integers(0, 2**31 - 1))
def test_mutated_models_get_exit_0_or_2_never_a_crash(tmp_path_factory, seed):
    folder = tmp_path_factory.mktemp("mutant")
    src = folder / "m.onnx"
    src.write_bytes(_mutate(BASE, random.Random(seed)))
    before = src.read_bytes()
    result = CliRunner().invoke(
        cli, ["fold", str(src), "-o", str(folder / "o.onnx")], catch_exceptions=False
    )
    assert result.exit_code in (0, 2), result.output
    assert "unexpected" not in result.output, (
        result.output
    )  # every error is one normfuse understands
    if result.exit_code == 2:
        lines = [ln for ln in result.output.strip().splitlines() if ln.startswith("error:")]
        assert len(lines) == 1, result.output
        assert not (folder / "o.onnx").exists()
    assert src.read_bytes() == before


def test_mutator_really_mutates():
    """The fuzzer is only as good as its mutants: most must differ from the base model."""
    base = BASE.SerializeToString()
    mutants = [_mutate(BASE, random.Random(seed)) for seed in range(300)]
    changed = sum(m != base for m in mutants)
    assert changed == len(mutants), "some mutants equal the base model"
    assert len(set(mutants)) >= 100  # and varied (several kinds have few outcomes on a small model)


# ------------------------------------- hostile tensors, files and .pt2 expressions (issue 16)
def _big_model() -> onnx.ModelProto:
    """Weights above the lazy loader's threshold, so that the self-backed path reads them."""
    rng = np.random.default_rng(11)
    b = Builder(rng, [1, 16, 5, 5], constant_nodes=False)
    b.conv(False, 16, 3, 1, 1, True, 1)
    b.bn(False)
    b.emit("Relu", [])
    b.conv(False, 16, 1, 1, 0, False, 1)
    b.nodes.append(helper.make_node("Identity", [b.cur], ["y"]))
    return make_model(
        b.nodes, [("x", TP.FLOAT, [1, 16, 5, 5])], [("y", TP.FLOAT, None)], b.inits, opset=17
    )


BIG = _big_model()

_LOCATIONS = ["../x.bin", "/etc/passwd", "w\x00.bin", "w\n.bin", "missing.bin", "", "."]


def _hostile_tensor(model: onnx.ModelProto, r: random.Random) -> bytes:
    """One of: raw_data shorter or longer than the dims need, dims inflated to claim far more
    elements than stored, or an external-data location that is hostile or missing."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = [t for t in m.graph.initializer if t.raw_data]
    t = r.choice(inits)
    what = r.choice(["short_raw", "long_raw", "inflate_dims", "location"])
    if what == "short_raw":
        t.raw_data = t.raw_data[: r.randrange(len(t.raw_data))]
    elif what == "long_raw":
        t.raw_data = t.raw_data + bytes(r.randint(1, 64))
    elif what == "inflate_dims":
        i = r.randrange(len(t.dims))
        t.dims[i] = t.dims[i] * r.choice([2, 1000, 10**6, 10**12])
    else:
        data = t.raw_data
        t.ClearField("raw_data")
        t.data_location = TP.EXTERNAL
        for key, value in (("location", r.choice(_LOCATIONS)), ("length", str(len(data)))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
    return m.SerializeToString()


@MUTANTS
@given(st.integers(0, 2**31 - 1), st.sampled_from(["fold", "inspect"]))
def test_hostile_tensors_get_one_error_line(tmp_path_factory, seed, command):
    folder = tmp_path_factory.mktemp("hostile")
    src = folder / "m.onnx"
    src.write_bytes(_hostile_tensor(BIG, random.Random(seed)))
    out = folder / "o.onnx"
    args = [command, str(src)] + (["-o", str(out), "--no-check"] if command == "fold" else [])
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 2, result.output  # every mutant is wrong: none may pass
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "unexpected" not in lines[0]
    assert not out.exists()


@settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["fifo", "dir", "link-to-dir", "dangling", "dev"]))
def test_non_regular_inputs_and_outputs_are_refused(tmp_path_factory, kind):
    folder = tmp_path_factory.mktemp("nonregular")
    src = folder / "m.onnx"
    src.write_bytes(BASE.SerializeToString())
    special = folder / "special.onnx"
    if kind == "fifo":
        if not hasattr(os, "mkfifo"):
            return
        os.mkfifo(special)
    elif kind == "dir":
        special.mkdir()
    elif kind == "link-to-dir":
        special.symlink_to(folder)
    elif kind == "dangling":
        special.symlink_to(folder / "nowhere")
    else:
        if not os.path.exists("/dev/null"):
            return
        special = __import__("pathlib").Path("/dev/null")
    for args in (
        ["fold", str(special), "-o", str(folder / "o.onnx"), "--no-check"],
        # a link needs --force (and then the link is replaced, never its target); anything
        # else that is not a regular file is refused even with --force
        ["fold", str(src), "-o", str(special), "--no-check"]
        + ([] if kind in ("link-to-dir", "dangling") else ["--force"]),
    ):
        result = CliRunner().invoke(cli, args, catch_exceptions=False)
        assert result.exit_code == 2, (args, result.output)
        lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert not (folder / "o.onnx").exists()
    if kind in ("dangling", "link-to-dir"):
        assert special.is_symlink()


_SAFE_PARTS = ["s0", "s77", "u1", "2", "17", " + ", " - ", " * ", " // ", " % ", " / "]
_HOSTILE_PARTS = [
    "__import__('os')",
    ".system('x')",
    "eval('1')",
    "exec('x')",
    "open('f')",
    "lambda: 0",
    "[0]",
    "getattr(s0, 'x')",
    "s0.__class__",
    "'os'",
    "{}",
    "Symbol('s0').func",
    "f(s0)",
    "Integer(1)[0]",
    "\\x00",
    ";",
    "`",
]


@settings(
    max_examples=1000 if LONG else 200, deadline=None, suppress_health_check=list(HealthCheck)
)
@given(st.lists(st.sampled_from(_SAFE_PARTS), min_size=0, max_size=6), st.data())
def test_pt2_expressions_outside_the_grammar_are_refused(safe, data):
    """Hostile fragments spliced into arithmetic are always refused; arithmetic and sympy's
    srepr of symbols always pass (the validator of .pt2 ``expr_str`` strings)."""
    import pytest

    pytest.importorskip("torch")
    from normfuse.core.errors import InputError
    from normfuse.torchmodel.export import _check_expression

    plain = "".join(safe) or "s0"
    if not plain.strip().startswith(("+", "-", "*", "/", "%")) and not plain.rstrip().endswith(
        ("+", "-", "*", "/", "%")
    ):
        _check_expression(plain, "test")  # in the grammar (even if not valid arithmetic)
    _check_expression("Symbol('s77', positive=True, integer=True)", "test")
    _check_expression("FloorDiv(Symbol('s0', integer=True), Integer(2))", "test")
    hostile = data.draw(st.sampled_from(_HOSTILE_PARTS))
    at = data.draw(st.integers(0, len(plain)))
    text = plain[:at] + hostile + plain[at:]
    try:
        _check_expression(text, "test")
    except InputError:
        return
    raise AssertionError(f"accepted {text!r}")
