"""Judging a float32/float64 rewrite at its own precision, against the models' own noise.

onnxruntime has no float64 Conv, so a float32 model cannot be run wider: both models run at their
own precision, and what separates them is judged against what moving every weight of a model by
one unit in the last place moves each tensor (:class:`Graph`, :func:`measure_noise`,
:func:`judge_against_noise`), on every tensor both models compute with the same meaning
(:func:`inner_tensors`), not only the outputs. The flow is
:func:`normfuse.runtime.parity.check_by_noise`; 16-bit models are judged upcast
(:mod:`normfuse.runtime.judge`).

Imports: numpy, onnx, :mod:`normfuse.core`, :mod:`normfuse.onnxgraph` and the runtime package.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from collections.abc import Collection, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from normfuse.core.algebra import parallel_map
from normfuse.core.report import OutputParity
from normfuse.core.verdict import (
    CHANNEL_FLOOR_FACTOR,
    NATIVE_INNER_NOISE_FACTOR,
    NOISE_FACTOR,
    channel_result,
    compare_outputs,
    noise_floor,
    pair_stats,
    worse,
)
from normfuse.onnxgraph import wire
from normfuse.onnxgraph.const import SHAPE_READERS
from normfuse.onnxgraph.graph import tensor_proto_nbytes
from normfuse.onnxgraph.paths import LAYOUT_OPS
from normfuse.runtime.sessions import ModelSource, run_session

__all__ = [
    "MAX_INNER",
    "MAX_WEIGHTS",
    "NOISE_PARTS",
    "PART_BYTES",
    "WEIGHT_OPS",
    "Difference",
    "Graph",
    "differences",
    "inner_tensors",
    "judge_against_noise",
    "measure_noise",
    "read_graph",
    "selection_note",
]

logger = logging.getLogger(__name__)


#: At most this many weights are made overridable and re-rounded, the largest: onnxruntime
#: builds a session with many overridable initializers slowly (10k of them: 9 s against 3 s),
#: and the small ones (scalars, per-channel vectors) move the outputs least.
MAX_WEIGHTS = 2000

#: Weights above this many bytes are re-rounded in parts of at most this size (at most
#: :data:`NOISE_PARTS` of them), one run each, so that the moved copy held at a time is at most
#: 128 MB, or a quarter of the weights beyond 512 MB (the effects of the parts are summed: a bound on moving
#: all at once, as the effect is linear in a unit of roundoff).
PART_BYTES = 128 << 20
NOISE_PARTS = 4

#: Ops whose float constant inputs are weights: re-rounding them is what rounding does in this
#: model. A constant read by any other op (Resize scales, a Reshape or Pow operand) stays as it is.
WEIGHT_OPS = frozenset(
    {
        "Add",
        "BatchNormalization",
        "Conv",
        "ConvTranspose",
        "Div",
        "Einsum",
        "Gemm",
        "GroupNormalization",
        "InstanceNormalization",
        "LayerNormalization",
        "MatMul",
        "Mul",
        "PRelu",
        "RMSNormalization",
        "Sub",
    }
)
_FLOAT_TYPES = {onnx.TensorProto.FLOAT: np.int32, onnx.TensorProto.DOUBLE: np.int64}


@dataclasses.dataclass
class Graph:
    """A model's graph without its tensor bytes where they are external, and where those are."""

    proto: onnx.ModelProto
    folder: Path | None

    @functools.cached_property
    def initializers(self) -> dict[str, onnx.TensorProto]:
        return {t.name: t for t in self.proto.graph.initializer}

    def raw(self, t: onnx.TensorProto) -> np.ndarray | None:
        """A tensor's bytes without a copy (its ``raw_data``, or its external data mapped), or
        ``None`` when they are stored otherwise or their location is not a plain file inside
        the model's folder with room for them."""
        if t.HasField("raw_data"):
            return np.frombuffer(t.raw_data, np.uint8)
        where = self._external(t)
        if where is None:
            return None
        path, offset, length = where
        if length == 0:
            return np.zeros(0, np.uint8)
        maps = self.__dict__.setdefault("_maps", {})
        if path not in maps:  # one map per file, not per tensor (267 on ResNet-50: 50 ms)
            maps[path] = np.memmap(path, np.uint8, "r")
        return maps[path][offset : offset + length]

    def _external(self, t: onnx.TensorProto) -> tuple[Path, int, int] | None:
        """Where an external tensor's bytes lie (file, offset, length), or ``None`` when its
        location is not a plain file inside the model's folder with room for them."""
        if t.data_location != onnx.TensorProto.EXTERNAL or self.folder is None:
            return None
        info = {e.key: e.value for e in t.external_data}
        files = self.__dict__.setdefault("_files", {})
        try:
            location = info["location"]
            if location not in files:  # resolved and checked once per file
                path = (self.folder / location).resolve()
                inside = path.is_relative_to(self.folder.resolve()) and path.is_file()
                files[location] = (path, path.stat().st_size) if inside else None
            found = files[location]
            if found is None:
                return None
            path, size = found
            offset = int(info.get("offset", 0))
            length = int(info.get("length", size - offset))
        except (KeyError, ValueError, OSError):
            return None
        if offset < 0 or length < 0 or offset + length > size:
            return None
        return path, offset, length

    def _bits(self, t: onnx.TensorProto, bits_type: type) -> np.ndarray | None:
        """A new array of a float tensor's stored bits as integers of its width, or ``None``
        when they are not stored plainly with the right size. An external tensor is read
        straight into the array (a map's page faults cost twice as much)."""
        stored = np.dtype(bits_type).newbyteorder("<")
        nbytes = int(np.prod(t.dims)) * stored.itemsize
        if t.HasField("raw_data"):
            if len(t.raw_data) != nbytes:
                return None
            return np.frombuffer(t.raw_data, stored).astype(bits_type)
        where = self._external(t)
        if where is None or where[2] != nbytes:
            return None
        path, offset, _ = where
        out = np.empty(nbytes // stored.itemsize, stored)
        with open(path, "rb") as f:
            f.seek(offset)
            if f.readinto(memoryview(out).cast("B")) != nbytes:
                return None
        return out.astype(bits_type, copy=False)

    def fingerprint(self, name: str) -> tuple[int, int, bytes]:
        """A tensor's type, size and up to 64 KiB of its bytes, evenly strided (a fold rescales
        nearly every element of a weight; read without loading the tensor)."""
        t = self.initializers[name]
        data = self.raw(t)
        if data is None:
            try:
                data = np.frombuffer(onnx.numpy_helper.to_array(t).tobytes(), np.uint8)
            except Exception:  # unreadable here: unlike anything, so the name is not compared
                return -1, id(t), b""
        return t.data_type, len(data), bytes(data[:: max(1, len(data) // 65536)])

    @property
    def nodes(self) -> int:
        return len(self.proto.graph.node)

    def inline_bytes(self) -> int:
        """The bytes of the initializers held in the graph itself (not external), counted from
        their dims and types (``ByteSize()`` would encode them to count them)."""
        total = 0
        for t in self.proto.graph.initializer:
            if t.data_location != onnx.TensorProto.EXTERNAL:
                n = tensor_proto_nbytes(t)
                total += t.ByteSize() if n is None else n
        return total

    def outputs(self) -> list[str]:
        return [o.name for o in self.proto.graph.output]

    def values(self) -> list[str]:
        """The main graph's node outputs, in node order."""
        return [v for n in self.proto.graph.node for v in n.output if v]

    def weights(self, limit: int = MAX_WEIGHTS) -> dict[str, int]:
        """Float initializers read only by :data:`WEIGHT_OPS` (name -> element type), the
        ``limit`` largest (:data:`MAX_WEIGHTS`)."""
        readers: dict[str, set[str]] = {}
        for node in self.proto.graph.node:
            for name in node.input:
                readers.setdefault(name, set()).add(node.op_type)
        outputs = set(self.outputs())
        found = {
            t.name: t.data_type
            for t in self.proto.graph.initializer
            if t.data_type in _FLOAT_TYPES
            and readers.get(t.name)
            and readers[t.name] <= WEIGHT_OPS
            and t.name not in outputs
        }
        if len(found) > limit:
            size = {t.name: int(np.prod(t.dims)) for t in self.proto.graph.initializer}
            found = dict(sorted(found.items(), key=lambda kv: -size[kv[0]])[:limit])
        return found

    def release(self) -> None:
        """Drop the tensors (the graph stays readable): once a model's session has run."""
        self.__dict__.pop("initializers", None)
        self.__dict__.pop("_maps", None)
        self.__dict__.pop("_files", None)
        self.proto.graph.ClearField("initializer")

    def session_bytes(self, expose: Sequence[str], weights: Mapping[str, int]) -> bytes:
        """The model with ``expose`` as extra outputs and ``weights`` as overridable inputs.

        Before IR version 4 onnxruntime overrides no initializer, although the format lists
        every one as an input (Caffe2-era model-zoo files are IR 3): the session's copy says IR 4,
        which reads the same graph and makes those inputs overridable; the model is unchanged.
        """
        graph = self.proto.graph
        n_out, n_in = len(graph.output), len(graph.input)
        ir_version = self.proto.ir_version
        if weights and ir_version < 4:
            self.proto.ir_version = 4
        inputs = {i.name for i in graph.input}
        outputs = set(self.outputs())
        graph.output.extend(onnx.ValueInfoProto(name=v) for v in expose if v not in outputs)
        graph.input.extend(
            onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
            for t in graph.initializer
            if t.name in weights and t.name not in inputs
        )
        try:
            return self.proto.SerializeToString()
        finally:
            del graph.output[n_out:]
            del graph.input[n_in:]
            self.proto.ir_version = ir_version

    def rerounded(
        self, weights: Mapping[str, int], rng: np.random.Generator
    ) -> dict[str, np.ndarray]:
        """Each weight moved one unit in the last place, up or down at random (zeros and
        non-finite values stay): twice the largest error of one rounding, as the models' own
        arithmetic (a norm computed in float32, another summation order) adds roundings of its
        own that this stands for."""
        base = str(self.folder) if self.folder is not None else ""
        moved: dict[str, np.ndarray] = {}
        for t in self.proto.graph.initializer:
            if t.name not in weights:
                continue
            bits_type = _FLOAT_TYPES[t.data_type]
            bits = self._bits(t, bits_type)
            if bits is not None:
                array = bits.view(np.float32 if bits_type is np.int32 else np.float64)
                array = array.reshape(tuple(t.dims))
            else:
                array = np.array(onnx.numpy_helper.to_array(t, base), copy=True)
            flat = array.reshape(-1)
            # one random bit per element: an eighth of the random bytes of one byte each
            coins = np.frombuffer(rng.bytes((flat.size + 7) // 8), np.uint8)
            step = np.unpackbits(coins, count=flat.size).view(np.int8)
            step <<= 1
            step -= 1  # -1 or +1, in place: few passes over a large weight
            np.putmask(step, flat == 0, 0)
            if not np.isfinite(flat).all():
                np.putmask(step, ~np.isfinite(flat), 0)
            bits = flat.view(bits_type)
            bits += step
            moved[t.name] = array
        return moved


#: At most this many inner tensors are exposed and compared: onnxruntime's session creation
#: grows faster than linearly in the number of graph outputs (50k exposed outputs: 15 s against
#: 1.5 s for the same graph). Beyond it the outputs of linear ops come first (a folded op's
#: output keeps the name of the norm it absorbed: where a wrong fold shows first), then the rest
#: evenly spaced.
MAX_INNER = 5000
_LINEAR_OPS = frozenset({"Conv", "ConvTranspose", "Gemm", "MatMul", "Einsum"})


#: Ops a rewrite can leave between a linear op and the norm it absorbs (and keep the names of).
_PASS_OPS = LAYOUT_OPS  # what a fold passes through (a Pad that repeats values too)
_AFFINE_OPS = frozenset({"BatchNormalization", "Add", "Sub", "Mul", "Div"})
#: Linear ops without a bias input: a norm folded into one from before leaves its shift to the
#: bias ``Add`` that follows.
_BIASLESS_OPS = frozenset({"MatMul", "Einsum"})
_NORM_OPS = frozenset(
    {"LayerNormalization", "GroupNormalization", "InstanceNormalization", "RMSNormalization"}
)


def inner_tensors(reference: Graph, candidate: Graph, limit: int = MAX_INNER) -> list[str]:
    """The main-graph tensors both models compute by name and with the same meaning (not the
    outputs), at most ``limit`` (:data:`MAX_INNER`), in the reference's node order.

    A fold keeps the names inside the chain it rewrites while their values change: folding
    ``MatMul -> Add(b) -> Mul(gamma)`` leaves ``MatMul(W * gamma)`` under the MatMul's name, on
    ``Conv -> Transpose -> BN`` the Transpose's output is the scaled one, and a norm folded into
    the op after it leaves the ops between them reading the unnormalised tensor. So for every
    per-channel affine op of the reference (BN, Add/Sub/Mul/Div by a constant) that the
    candidate no longer computes under its name, and every norm whose constants changed, the
    names between it and the linear op it went into (either way, through layout ops and other
    such affine ops) are not compared. The names that hold the chain's result are: the norm's,
    now the folded op's output, and every tensor after it.
    """
    graph = reference.proto.graph
    producers = {v: n for n in graph.node for v in n.output if v}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in graph.node:
        for v in n.input:
            consumers.setdefault(v, []).append(n)
    cand_nodes = {v: n for n in candidate.proto.graph.node for v in n.output if v}

    constant = _constant_like(graph, reference.initializers)
    depth: dict[str, int] = {}  # the longest path from a source, through values read
    for n in graph.node:
        read = (i for i in n.input if i and not _reads_type_only(n, i))
        d = 1 + max((depth.get(i, 0) for i in read), default=0)
        depth.update((o, d) for o in n.output if o)

    def affine(n: onnx.NodeProto) -> bool:
        if n.op_type == "BatchNormalization":
            return True
        return n.op_type in _AFFINE_OPS and any(i in constant for i in n.input)

    def data_input(n: onnx.NodeProto) -> str | None:
        # the input that is no constant; where a whole branch is (DETR's first decoder layer
        # reads only learned queries), the deepest: a chain runs through it, not a bias
        inputs = [i for i in n.input if i]
        data = [i for i in inputs if i not in constant]
        if data:
            return data[0]
        return max(inputs, key=lambda i: depth.get(i, 0), default=None)

    def upstream(v: str | None) -> list[str]:
        path: list[str] = []
        while v is not None and v in producers:
            path.append(v)
            p = producers[v]
            if p.op_type in _LINEAR_OPS:
                return path
            if p.op_type not in _PASS_OPS and not affine(p):
                break
            v = data_input(p)
        return []

    def downstream(v: str) -> list[str]:
        # every branch from v to the linear ops it was folded into (a norm read by q, k and v
        # projections: three); none when a branch ends elsewhere
        path, todo, reached = [v], [v], False
        while todo:
            u = todo.pop()
            for c in consumers.get(u, []):
                if _reads_type_only(c, u):
                    continue
                if c.op_type in _LINEAR_OPS:
                    if c.op_type in _BIASLESS_OPS and c.output and c.output[0]:
                        # no bias input: the norm's shift went to the Add after it, so the op's
                        # own output differs from the original's by that constant
                        path.append(c.output[0])
                    reached = True
                    continue
                if (c.op_type not in _PASS_OPS and not affine(c)) or not c.output:
                    return []
                path.append(c.output[0])
                todo.append(c.output[0])
        return path if reached else []

    changed: set[str] = set()
    for n in graph.node:
        if not n.output or not n.output[0]:
            continue
        out = n.output[0]
        kept = cand_nodes.get(out)
        if affine(n) and (kept is None or kept.op_type != n.op_type):
            changed.update(upstream(data_input(n)))
            if kept is None:
                changed.update(downstream(out))
        elif (
            n.op_type in _NORM_OPS
            and kept is not None
            and kept.op_type == n.op_type
            and _constants_differ(n, kept, reference, candidate)
        ):
            changed.update(downstream(out) or [out])
    outputs = set(reference.outputs())
    chosen = _selected(graph)
    shared = [
        v
        for v in dict.fromkeys(reference.values())
        if v in cand_nodes and v not in outputs and v not in changed and v not in chosen
    ]
    if len(shared) <= limit:
        return shared
    linear = [v for v in shared if cand_nodes[v].op_type in _LINEAR_OPS]
    if len(linear) >= limit:
        keep = set(linear[:: -(-len(linear) // limit)])
    else:
        rest = [v for v in shared if cand_nodes[v].op_type not in _LINEAR_OPS]
        keep = set(linear) | set(rest[:: -(-len(rest) // (limit - len(linear)))])
    return [v for v in shared if v in keep]


#: Ops that select positions (their outputs, or TopK's indices): among near-equal values one
#: rounding picks another one, so what depends on them is not judged by a tolerance inside the
#: model (RT-DETR's query selection: TopK indices and the index arithmetic after them).
_SELECTING_OPS = {"ArgMax": None, "ArgMin": None, "NonZero": None, "NonMaxSuppression": None,
                  "Unique": None, "TopK": 1}  # fmt: skip


def selection_note(graph: onnx.GraphProto) -> str | None:
    """What the check says of a model that selects (:data:`_SELECTING_OPS`), or ``None``."""
    found = [n for n in graph.node if n.op_type in _SELECTING_OPS and n.domain in ("", "ai.onnx")]
    if not found:
        return None
    first = f"{found[0].op_type} '{found[0].name}'" + (
        f" and {len(found) - 1} more" if len(found) > 1 else ""
    )
    return (
        f"the model selects ({first}): where values lie within rounding of a tie, a model may "
        "pick another one, and what follows can then differ by more than any tolerance on "
        "some inputs (also between two runs of one file on different kernels); what is "
        "computed from a selection is judged at the outputs only"
    )


def _selected(graph: onnx.GraphProto) -> set[str]:
    """The tensors that depend on a selection (:data:`_SELECTING_OPS`), in the main graph."""
    found: set[str] = set()
    for n in graph.node:
        if n.op_type in _SELECTING_OPS and n.domain in ("", "ai.onnx"):
            index = _SELECTING_OPS[n.op_type]
            outs = list(n.output) if index is None else list(n.output[index : index + 1])
            found.update(o for o in outs if o)
        elif any(i in found and not _reads_type_only(n, i) for i in n.input if i):
            found.update(o for o in n.output if o)
    return found


#: Ops whose output is a random draw, not a function of their inputs.
_RANDOM_OPS = frozenset(
    {"RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike", "Multinomial"}
)
#: Ops whose output is a tensor's shape, not its values.
_SHAPE_OPS = frozenset({"Shape", "Size"})


def _reads_type_only(node: onnx.NodeProto, value: str) -> bool:
    """Whether ``node`` reads only the shape or element type of ``value`` at every position it
    reads it (:data:`normfuse.onnxgraph.const.SHAPE_READERS`), not its values."""
    where = [i for i, name in enumerate(node.input) if name == value]
    shape_only = SHAPE_READERS.get(node.op_type, frozenset())
    return node.domain in ("", "ai.onnx") and bool(where) and set(where) <= shape_only


def _constant_like(graph: onnx.GraphProto, initializers: Collection[str]) -> set[str]:
    """The values that hold nothing of the inputs' values, which a fold treats as constants:
    initializers, ``Constant`` outputs, tensor shapes, and what other ops compute from those
    alone (an exporter's ``Identity`` of a shared bias, the attention scale
    ``Sqrt(1 / Sqrt(Cast(Shape(q)[-1])))`` of a decomposed scaled-dot-product attention)."""
    found = set(initializers)
    for n in graph.node:  # in topological order
        read = [i for i in n.input if i and not _reads_type_only(n, i)]
        if n.op_type in _SHAPE_OPS or (
            n.op_type not in _RANDOM_OPS and all(i in found for i in read)
        ):
            found.update(o for o in n.output if o)
    return found


def _constants_differ(ref: onnx.NodeProto, cand: onnx.NodeProto, a: Graph, b: Graph) -> bool:
    """Whether two nodes read constants of other names or contents at some input position."""
    if len(ref.input) != len(cand.input):
        return True
    for x, y in zip(ref.input, cand.input, strict=True):
        const_x, const_y = x in a.initializers, y in b.initializers
        if (const_x or const_y) and (
            not (const_x and const_y) or x != y or a.fingerprint(x) != b.fingerprint(y)
        ):
            return True
    return False


def read_graph(source: ModelSource) -> Graph:
    """The model's graph without its tensor bytes where they lie in a file: a file's large inline
    tensors become references into it (:func:`~normfuse.onnxgraph.wire.light_proto`), which
    onnxruntime reads from the file itself, so a session is built from a few kilobytes of graph
    instead of a serialized copy of the weights; external tensors are not read.

    The references name the file as it really is (a symbolic link resolved: onnxruntime refuses
    a reference that leads out of the model's folder); a model that also has external data of
    its own keeps the folder it was named in, its inline tensors then parsed as they are.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        real = path.resolve()
        proto = wire.light_proto(real)
        if proto is not None and _locations(proto) == {real.name}:
            return Graph(proto, real.parent)
        return Graph(onnx.load(str(path), load_external_data=False), path.parent)
    return Graph(onnx.load_from_string(bytes(source)), None)


def _locations(model: onnx.ModelProto) -> set[str]:
    """The external-data locations of every tensor of the model, subgraphs included."""
    found: set[str] = set()
    graphs = [model.graph]
    while graphs:
        graph = graphs.pop()
        tensors = list(graph.initializer)
        for node in graph.node:
            for attr in node.attribute:
                graphs += ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
                tensors += ([attr.t] if attr.HasField("t") else []) + list(attr.tensors)
        for t in tensors:
            if t.data_location == onnx.TensorProto.EXTERNAL:
                found |= {e.value for e in t.external_data if e.key == "location"}
    return found


def measure_noise(
    session: Any,
    graph: Graph,
    weights: Mapping[str, int],
    wanted: list[str],
    batches: Sequence[Mapping[str, np.ndarray]],
    runs: Sequence[Sequence[Any]],
    seed: int,
    draws: int = 1,
) -> tuple[dict[str, float], dict[str, float]] | str:
    """How much re-rounding the weights moves each tensor, whole and per channel.

    ``session`` runs ``graph`` with ``weights`` overridable; ``runs`` are its outputs ``wanted``
    on ``batches`` with the weights as they are. ``draws`` independent re-roundings, each on
    every batch; the largest effect counts.

    Returns:
        ``(max_rel per tensor, per-channel max_rel per tensor)``, or why the measurement is not
        usable (a re-rounding changed a tensor's shape or finiteness).
    """
    effect = dict.fromkeys(wanted, 0.0)
    channel = dict.fromkeys(wanted, 0.0)
    parts = _parts(graph, weights)
    for k in range(draws):
        rng = np.random.default_rng(seed + 1000 * k)
        # per batch and tensor, the sum over the parts: a bound on re-rounding all at once
        moved_by = [dict.fromkeys(wanted, 0.0) for _ in batches]
        by_channel = [dict.fromkeys(wanted, 0.0) for _ in batches]
        for part in parts:
            moved_weights = graph.rerounded(part, rng)
            for b, (feeds, base) in enumerate(zip(batches, runs, strict=True)):
                moved = run_session(session, wanted, {**feeds, **moved_weights}, "re-rounded")
                pairs = []
                for name, c, m in zip(wanted, base, moved, strict=True):
                    c, m = np.asarray(c), np.asarray(m)
                    if not np.issubdtype(c.dtype, np.floating):
                        continue
                    if c.shape != m.shape:
                        return f"re-rounding the weights changes the shape of '{name}'"
                    if c.size:
                        pairs.append((name, c, m))
                del moved
                measured = parallel_map(lambda p: pair_stats(p[1], p[2], cosine=False), pairs)
                for (name, _, _), stats in zip(pairs, measured, strict=True):
                    if stats.nonfinite_mismatch:
                        return f"re-rounding the weights makes '{name}' non-finite"
                    by_channel[b][name] += stats.channel[0]
                    diff, scale = stats.max_abs, stats.scale
                    moved_by[b][name] += diff / scale if scale else diff
            del moved_weights
        for b in range(len(batches)):
            for name in wanted:
                effect[name] = max(effect[name], moved_by[b][name])
                channel[name] = max(channel[name], by_channel[b][name])
    return effect, channel


def _parts(graph: Graph, weights: Mapping[str, int]) -> list[dict[str, int]]:
    """``weights`` in at most :data:`NOISE_PARTS` groups of similar size in bytes, each
    re-rounded in a run of its own, so that only one group's moved copy is held at a time."""
    sizes = {
        t.name: int(np.prod(t.dims)) * (4 if t.data_type == onnx.TensorProto.FLOAT else 8)
        for t in graph.proto.graph.initializer
        if t.name in weights
    }
    total = sum(sizes.values())
    count = max(1, min(NOISE_PARTS, -(-total // PART_BYTES)))
    budget = total / count
    parts: list[dict[str, int]] = [{}]
    filled = 0
    for name, size in sizes.items():
        if parts[-1] and filled + size > budget and len(parts) < count:
            parts.append({})
            filled = 0
        parts[-1][name] = weights[name]
        filled += size
    return parts


@dataclasses.dataclass
class Difference:
    """What separates the two models on one tensor, before its tolerance is known."""

    result: OutputParity  #: compared with ``atol`` 0 (non-floats: final, by the dtype's default)
    scale: float  #: ``max|reference|`` over the finite elements
    floor: float | None  #: the rtol floor of its dtype; ``None`` for non-floats
    channel: tuple[float, int, float]  #: :func:`per_channel_rel` of the two


def differences(
    wanted: list[str],
    ref_runs: Sequence[Sequence[Any]],
    cand_runs: Sequence[Sequence[Any]],
    defaults: Mapping[str, tuple[float, float]],
    outputs: Collection[str],
) -> list[dict[str, Difference]]:
    """Per batch and tensor, the difference of the two models' runs (so that the reference's
    tensors need not be held while the candidate's noise is measured); ``outputs``: the model's
    outputs among ``wanted``."""
    out = []
    for ref_all, cand_all in zip(ref_runs, cand_runs, strict=True):
        found = {}
        arrays = [
            (name, np.asarray(r), np.asarray(c))
            for name, r, c in zip(wanted, ref_all, cand_all, strict=True)
        ]
        pairs = [(n, r, c) for n, r, c in arrays if _comparable(r, c)]
        stats_of = parallel_map(lambda p: pair_stats(p[1], p[2], cosine=p[0] in outputs), pairs)
        measured = {n: stats for (n, _, _), stats in zip(pairs, stats_of, strict=True)}
        for name, r, c in arrays:
            floor = noise_floor(str(r.dtype))
            if floor is None:
                found[name] = Difference(
                    compare_outputs(name, r, c, None, None, defaults), 0.0, None, (0.0, -1, 0.0)
                )
                continue
            if r.shape != c.shape:
                found[name] = Difference(
                    compare_outputs(name, r, c, 0.0, 0.0), 0.0, floor, (0.0, -1, 0.0)
                )
                continue
            # the cosine only where the tensor may fail: its error above the lowest tolerance
            stats = measured[name]
            if name not in outputs and stats.max_abs > floor * stats.scale:
                stats = pair_stats(r, c)  # rare: an exact fold leaves few tensors above it
            found[name] = Difference(
                compare_outputs(name, r, c, 0.0, 0.0, stats=stats),
                stats.scale,
                floor,
                stats.channel,
            )
        out.append(found)
    return out


def _comparable(r: np.ndarray, c: np.ndarray) -> bool:
    """Whether two tensors are compared by the noise rule: float, of one shape."""
    return noise_floor(str(r.dtype)) is not None and r.shape == c.shape


def judge_against_noise(
    names: list[str],
    found: Sequence[Mapping[str, Difference]],
    effect: Mapping[str, float],
    channel: Mapping[str, float],
) -> tuple[list[OutputParity], list[OutputParity]]:
    """The outputs judged against ``NOISE_FACTOR`` x their measured noise, and the inner tensors
    and channels that fail ``NATIVE_INNER_NOISE_FACTOR`` x theirs (:mod:`normfuse.core.verdict`);
    ``found`` from :func:`differences`."""
    outputs = set(names)
    worst: dict[str, OutputParity] = {}
    failed: dict[str, OutputParity] = {}
    for batch in found:
        for name, d in batch.items():
            result = d.result
            if d.floor is not None:
                factor = NOISE_FACTOR if name in outputs else NATIVE_INNER_NOISE_FACTOR
                rtol = max(d.floor, factor * effect[name])
                passed = result.nonfinite_mismatch == 0 and result.max_abs <= rtol * d.scale
                result = dataclasses.replace(result, rtol=rtol, passed=passed)
            if name in outputs:
                if name not in worst or worse(result, worst[name]):
                    worst[name] = result
            elif not result.passed and name not in failed:
                result.name = f"tensor '{name}' (inside the model)"
                failed[name] = result
            if name not in failed and d.floor is not None:
                rtol = max(
                    CHANNEL_FLOOR_FACTOR * d.floor, NATIVE_INNER_NOISE_FACTOR * channel[name]
                )
                hit = channel_result(name, result.dtype, d.channel, rtol)
                if hit is not None:
                    failed[name] = hit
    return [worst[n] for n in names], list(failed.values())
