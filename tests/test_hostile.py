"""Hostile and broken input: every case ends in exit code 2 with exactly one `error:` line on stderr (the Python
API raises a GraphpruneError), or in a correct result; no file but the requested outputs changes; memory stays
bounded (RLIMIT_AS in a subprocess for the big-dim cases). Every input is generated here, in tmp_path."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import stat
import struct
import subprocess
import sys
import threading
import zipfile
import zlib
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import graphprune
from graphprune.cli import main
from graphprune.errors import GraphpruneError
from graphprune.fileio import Terminated

RNG = np.random.default_rng(7)


# ---- model builders ---------------------------------------------------------------------------------------------

def _w(*shape, seed=0):
    return (np.random.default_rng(seed).standard_normal(shape) / np.sqrt(max(1, np.prod(shape[1:])))).astype(
        np.float32)


def conv_model(opset=17, ir=None, x_shape=("N", 3, 8, 8), names=("x", "w1", "h", "r", "w2", "y"), node_names=None,
               extra_nodes=(), extra_inits=None, extra_outputs=(), y_shape=None):
    """x -> Conv(8) -> Relu -> Conv(4) -> y: two prunable layers."""
    x, w1, h, r, w2, y = names
    n1, n2, n3 = node_names or ("conv1", "relu", "conv2")
    nodes = [helper.make_node("Conv", [x, w1], [h], name=n1, pads=[1, 1, 1, 1]),
             helper.make_node("Relu", [h], [r], name=n2),
             helper.make_node("Conv", [r, w2], [y], name=n3), *extra_nodes]
    inits = {w1: _w(8, 3, 3, 3, seed=1), w2: _w(4, 8, 1, 1, seed=2), **(extra_inits or {})}
    y_shape = y_shape or [x_shape[0], 4, x_shape[2], x_shape[3]]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info(x, TensorProto.FLOAT, list(x_shape))],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, y_shape), *extra_outputs],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = ir or min(onnx.helper.find_min_ir_version_for([helper.make_opsetid("", opset)]) + 1, 10)
    if model.ir_version < 4:  # IR 3: every initializer is a graph input too
        for t in graph.initializer:
            graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    return model


def save(model, path) -> Path:
    path = Path(path)
    path.write_bytes(model.SerializeToString())
    return path


def save_external(model, folder: Path, name="m.onnx", location="m.onnx.data") -> Path:
    onnx.save_model(model, str(folder / name), save_as_external_data=True, location=location, size_threshold=0)
    return folder / name


# ---- checks -----------------------------------------------------------------------------------------------------

def snapshot(folder: Path) -> dict:
    """Every file under folder (hidden ones too): content hash and mode; symlinks by target."""
    out = {}
    for p in sorted(folder.rglob("*")):
        rel = str(p.relative_to(folder))
        if p.is_symlink():
            out[rel] = ("link", os.readlink(p))
        elif p.is_file():
            out[rel] = (hashlib.sha256(p.read_bytes()).hexdigest(), stat.S_IMODE(p.stat().st_mode))
        elif stat.S_ISFIFO(p.lstat().st_mode):
            out[rel] = ("fifo",)
    return out


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_error(result, *needles):
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), result.stderr
    assert "Traceback" not in result.output
    assert "\x1b" not in result.stderr
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def assert_error_or_valid(result, output: Path):
    """A clean refusal, or a checker-valid output model."""
    if result.exit_code == 0:
        onnx.checker.check_model(onnx.load(str(output)), full_check=True)
        assert "verified" in result.stdout or "not verified" in result.stdout
    else:
        assert_one_error(result)


def run_checked(folder: Path, args, allowed=(), expect_error=True, needles=()):
    """Run the CLI; the folder may change only in `allowed` (file names)."""
    before = snapshot(folder)
    result = cli(*args)
    after = snapshot(folder)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert changed <= set(allowed), (changed, result.output)
    if expect_error:
        assert_one_error(result, *needles)
    return result


# ---- A. garbage and truncated model files -----------------------------------------------------------------------

GOOD = conv_model().SerializeToString()
GARBAGE = {
    "empty": b"",
    "one-byte": b"\x08",
    "text": b"this is not an onnx model\n",
    "json": json.dumps({"graph": {"node": []}}).encode(),
    "zip": b"PK\x03\x04" + bytes(100),
    "png": b"\x89PNG\r\n\x1a\n" + bytes(64),
    "tensor-proto": numpy_helper.from_array(np.ones(4, np.float32), "t").SerializeToString(),
    "varint-overflow": b"\x08" + b"\xff" * 20,
    "huge-length-prefix": b"\x3a\xff\xff\xff\xff\x0f" + bytes(16),
    "nul-bytes": bytes(4096),
    "appended-garbage": GOOD + b"\xff\xfe\xfd",
    **{f"random-{k}": RNG.bytes(n) for k, n in enumerate((3, 17, 100, 1000, 4096, 20000, 65536, 7, 513, 2049))},
    **{f"truncated-{f}": GOOD[: int(len(GOOD) * f)] for f in (0.05, 0.1, 0.2, 0.3, 0.5, 0.7, 0.9, 0.97, 0.99)},
    **{f"bitflip-{k}": bytes(b ^ (0xFF if i == pos else 0) for i, b in enumerate(GOOD))
       for k, pos in enumerate((3, 40, 200, 400, len(GOOD) // 2, len(GOOD) - 5))},
}


@pytest.mark.parametrize("command", ["prune", "analyze"])
@pytest.mark.parametrize("name", list(GARBAGE))
def test_garbage_model_files(tmp_path, name, command):
    path = tmp_path / "bad.onnx"
    path.write_bytes(GARBAGE[name])
    args = [command, path] + (["-o", tmp_path / "out.onnx"] if command == "prune" else [])
    before = snapshot(tmp_path)
    result = cli(*args)
    changed = {k for k in set(before) | set(snapshot(tmp_path)) if before.get(k) != snapshot(tmp_path).get(k)}
    if result.exit_code == 0:  # some truncations/bit flips still parse into a model: then the result must be right
        assert changed <= {"out.onnx"}
        if command == "prune":
            assert_error_or_valid(result, tmp_path / "out.onnx")
    else:
        assert_one_error(result)
        assert not changed


@pytest.mark.parametrize("name", ["empty", "random-3", "truncated-0.5", "tensor-proto"])
def test_garbage_through_the_api(tmp_path, name):
    path = tmp_path / "bad.onnx"
    path.write_bytes(GARBAGE[name])
    with pytest.raises(GraphpruneError):
        graphprune.prune(str(path), ratio=0.5)
    with pytest.raises(GraphpruneError):
        graphprune.analyze_model(str(path))


# ---- B. structurally invalid models -------------------------------------------------------------------------------

def _dup_initializer():
    m = conv_model()
    m.graph.initializer.append(numpy_helper.from_array(_w(8, 3, 3, 3, seed=9), "w1"))
    return m


def _dup_output():
    m = conv_model()
    m.graph.node.append(helper.make_node("Relu", ["h"], ["r"], name="relu_again"))
    return m


def _undefined_input():
    m = conv_model()
    m.graph.node[1].input[0] = "nowhere"
    return m


def _cycle():
    m = conv_model()
    m.graph.node[0].input[0] = "r"  # conv1 reads relu's output, relu reads conv1's
    return m


def _unknown_op():
    m = conv_model()
    m.graph.node[1].op_type = "NoSuchOp"
    return m


def _missing_opset_domain():
    m = conv_model()
    m.graph.node[1].domain = "com.example"
    return m


def _empty_op_type():
    m = conv_model()
    m.graph.node[1].op_type = ""
    return m


def _output_not_produced():
    m = conv_model()
    m.graph.output[0].name = "ghost"
    return m


def _attr_wrong_type():
    m = conv_model()
    m.graph.node[0].attribute.append(helper.make_attribute("strides", "two"))
    return m


def _tensor(mutate):
    def build():
        m = conv_model()
        mutate(m.graph.initializer[0])
        return m
    return build


def _ir_too_new():
    m = conv_model()
    m.ir_version = 99
    return m


def _opset_too_new():
    m = conv_model()
    m.opset_import[0].version = 99
    return m


def _no_input_type():
    m = conv_model()
    m.graph.input[0].ClearField("type")
    return m


def _if_undefined():
    then = helper.make_graph([helper.make_node("Identity", ["undefined_in_branch"], ["t"], name="ti")], "then", [],
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, None)])
    m = conv_model(extra_nodes=[helper.make_node("If", ["c"], ["o2"], name="if", then_branch=then, else_branch=then)],
                   extra_inits={"c": np.array(True)},
                   extra_outputs=[helper.make_tensor_value_info("o2", TensorProto.FLOAT, None)])
    return m


def _conv_weight_rank():
    m = conv_model()
    m.graph.initializer[0].CopyFrom(numpy_helper.from_array(_w(8, 3), "w1"))
    return m


def _self_loop():
    m = conv_model()
    m.graph.node[1].input[0] = "r"
    return m


INVALID = {
    "duplicate-initializer": (_dup_initializer, "initializer"),
    "duplicate-node-output": (_dup_output, "r"),
    "undefined-input": (_undefined_input, "nowhere"),
    "cycle": (_cycle, ""),
    "self-loop": (_self_loop, ""),
    "unknown-op": (_unknown_op, "NoSuchOp"),
    "undeclared-domain": (_missing_opset_domain, "com.example"),
    "empty-op-type": (_empty_op_type, ""),
    "output-not-produced": (_output_not_produced, ""),
    "attribute-wrong-type": (_attr_wrong_type, ""),
    "negative-dims": (_tensor(lambda t: t.dims.__setitem__(0, -8)), "negative"),
    "raw-data-short": (_tensor(lambda t: setattr(t, "raw_data", t.raw_data[:-4])), "raw_data"),
    "raw-data-long": (_tensor(lambda t: setattr(t, "raw_data", t.raw_data + b"\0" * 8)), "raw_data"),
    "raw-data-huge-dims": (_tensor(lambda t: t.dims.__setitem__(0, 10 ** 9)), "raw_data"),
    "float-data-count": (_tensor(lambda t: (t.ClearField("raw_data"), t.float_data.extend([1.0, 2.0]))), "values"),
    "unknown-dtype": (_tensor(lambda t: setattr(t, "data_type", 99)), "type"),
    "string-raw-data": (_tensor(lambda t: setattr(t, "data_type", TensorProto.STRING)), "string"),
    "no-data": (_tensor(lambda t: t.ClearField("raw_data")), ""),
    "ir-version-99": (_ir_too_new, ""),
    "opset-99": (_opset_too_new, ""),
    "input-without-type": (_no_input_type, ""),
    "if-branch-undefined": (_if_undefined, ""),
    "conv-weight-rank-2": (_conv_weight_rank, ""),
}


@pytest.mark.parametrize("command", ["prune", "analyze"])
@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_models_are_refused(tmp_path, name, command):
    build, needle = INVALID[name]
    path = save(build(), tmp_path / "m.onnx")
    args = [command, path] + (["-o", tmp_path / "out.onnx"] if command == "prune" else [])
    if name in ("opset-99", "conv-weight-rank-2") and command == "analyze":  # onnx accepts unknown future opsets; analysis may run
        result = run_checked(tmp_path, args, expect_error=False)
        assert result.exit_code == 0 or assert_one_error(result) is None
        return
    run_checked(tmp_path, args, needles=[needle] if needle else [])


def test_duplicate_initializer_is_not_repaired_by_the_api():
    with pytest.raises(GraphpruneError, match="initializer"):
        graphprune.prune(_dup_initializer(), ratio=0.5)


def test_checker_reason_is_in_the_error(tmp_path):
    path = save(_undefined_input(), tmp_path / "m.onnx")
    result = run_checked(tmp_path, [path, "-o", tmp_path / "o.onnx"])
    assert "invalid model" in result.stderr


def test_nodes_out_of_order_are_accepted(tmp_path):
    m = conv_model()
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend(reversed(nodes))
    path = save(m, tmp_path / "m.onnx")
    result = cli(path, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.output
    assert_error_or_valid(result, tmp_path / "o.onnx")


# ---- C. external data: every escape -------------------------------------------------------------------------------

def _external_model(tmp_path, location_for=None, mutate_entry=None, folder_name="ext"):
    folder = tmp_path / folder_name
    folder.mkdir()
    path = save_external(conv_model(), folder)
    model = onnx.load(str(path), load_external_data=False)
    t = model.graph.initializer[0]
    for e in t.external_data:
        if e.key == "location" and location_for is not None:
            e.value = location_for
    if mutate_entry:
        mutate_entry(t)
    save(model, path)
    return folder, path


def _set(key, value):
    def mutate(t):
        for e in t.external_data:
            if e.key == key:
                e.value = value
                return
        entry = t.external_data.add()
        entry.key, entry.value = key, value
    return mutate


ESCAPES = {
    "dotdot": dict(location_for="../secret.data", needle="outside"),
    "dotdot-deep": dict(location_for="sub/../../secret.data", needle="outside"),
    "absolute": dict(location_for="/etc/passwd", needle="absolute"),
    "absolute-secret": dict(location_for="{secret}", needle="absolute"),
    "backslash-root": dict(location_for="\\secret.data", needle="absolute"),
    "drive-letter": dict(location_for="C:secret.data", needle="absolute"),
    "nul-byte": dict(location_for="m.onnx.data\x00.png", needle="NUL"),
    "empty-location": dict(location_for="", needle="location"),
    "missing-file": dict(location_for="nothing-here.data", needle="not found"),
    "folder": dict(location_for=".", needle="folder"),
    "huge-offset": dict(mutate_entry=_set("offset", str(1 << 40)), needle="needs bytes"),
    "huge-length": dict(mutate_entry=_set("length", str(1 << 40)), needle="length"),
    "short-length": dict(mutate_entry=_set("length", "8"), needle="length"),
    "negative-offset": dict(mutate_entry=_set("offset", "-4"), needle="negative"),
    "text-offset": dict(mutate_entry=_set("offset", "twelve"), needle="integers"),
    "offset-past-end": dict(mutate_entry=_set("offset", "900"), needle="needs bytes"),
}


@pytest.mark.parametrize("command", ["prune", "analyze"])
@pytest.mark.parametrize("name", list(ESCAPES))
def test_external_data_escapes(tmp_path, name, command):
    case = dict(ESCAPES[name])
    secret = tmp_path / "secret.data"
    secret.write_bytes(np.zeros(1000, np.float32).tobytes())
    if case.get("location_for") == "{secret}":
        case["location_for"] = str(secret)
    folder, path = _external_model(tmp_path, case.get("location_for"), case.get("mutate_entry"))
    args = [command, path] + (["-o", folder / "out.onnx"] if command == "prune" else [])
    run_checked(tmp_path, args, needles=[case["needle"]])


@pytest.mark.parametrize("target", ["outside", "dev-zero", "fifo"])
def test_external_data_symlinks_and_special_files(tmp_path, target):
    secret = tmp_path / "secret.data"
    secret.write_bytes(np.zeros(1000, np.float32).tobytes())
    folder, path = _external_model(tmp_path, "link.data")
    if target == "outside":
        os.symlink(secret, folder / "link.data")
    elif target == "dev-zero":
        os.symlink("/dev/zero", folder / "link.data")
    else:
        os.mkfifo(folder / "link.data")
    run_checked(tmp_path, ["analyze", path], needles=["refused" if target != "fifo" else "FIFO"])


def _tensor_holder(kind):
    """A model whose external tensor sits somewhere other than the main graph's initializers."""
    t = numpy_helper.from_array(np.ones(300, np.float32), "c")
    if kind == "tensors-attribute":
        node = helper.make_node("Constant", [], ["k"], name="k")
        node.attribute.append(helper.make_attribute("value_floats", [1.0]))
        node.attribute[0].tensors.append(t)  # a tensor hiding in a mistyped attribute
        extra = [node]
    elif kind == "constant-value":
        extra = [helper.make_node("Constant", [], ["k"], name="k", value=t)]
    elif kind == "subgraph":
        branch = helper.make_graph([helper.make_node("Constant", [], ["b"], name="bc", value=t)], "b", [],
                                   [helper.make_tensor_value_info("b", TensorProto.FLOAT, [300])])
        extra = [helper.make_node("If", ["cond"], ["k"], name="if", then_branch=branch, else_branch=branch)]
    else:
        extra = []
    m = conv_model(extra_nodes=extra, extra_inits={"cond": np.array(True)} if kind == "subgraph" else None)
    if kind == "function":
        fn = helper.make_function("local", "F", [], ["o"], [helper.make_node("Constant", [], ["o"], value=t)],
                                  [helper.make_opsetid("", 17)])
        m.functions.append(fn)
        m.opset_import.append(helper.make_opsetid("local", 1))
        m.graph.node.append(helper.make_node("F", [], ["k"], domain="local", name="f"))
    if kind == "sparse-initializer":
        values = numpy_helper.from_array(np.ones(300, np.float32), "s")
        indices = numpy_helper.from_array(np.arange(300, dtype=np.int64), "s_idx")
        m.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [1000]))
    return m


@pytest.mark.parametrize("kind", ["tensors-attribute", "constant-value", "subgraph", "function",
                                  "sparse-initializer"])
def test_external_escape_anywhere_a_tensor_can_live(tmp_path, kind):
    m = _tensor_holder(kind)
    from graphprune.ir import _all_tensors
    hidden = [t for t in _all_tensors(m) if t.name in ("c", "s") or (t.dims and t.dims[0] == 300)]
    assert hidden, "the builder placed no tensor"
    for t in hidden:
        t.ClearField("raw_data")
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", "../secret.data"), ("offset", "0"), ("length", "1200")):
            e = t.external_data.add()
            e.key, e.value = key, value
    (tmp_path / "secret.data").write_bytes(bytes(4096))
    folder = tmp_path / "m"
    folder.mkdir()
    path = save(m, folder / "m.onnx")
    run_checked(tmp_path, ["analyze", path], needles=["outside"])


# ---- D. model paths that are not regular files ---------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "dev-null", "folder", "missing", "symlink-loop"])
def test_model_path_not_a_regular_file(tmp_path, kind):
    path = tmp_path / "m.onnx"
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "dev-zero":
        os.symlink("/dev/zero", path)
    elif kind == "dev-null":
        os.symlink("/dev/null", path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "symlink-loop":
        os.symlink(tmp_path / "loop2", path)
        os.symlink(path, tmp_path / "loop2")
    for args in (["analyze", path], ["prune", path, "-o", tmp_path / "out.onnx"]):
        run_checked(tmp_path, args)


# ---- E. every option's bad values ------------------------------------------------------------------------------------

BAD_OPTIONS = [
    ["--ratio", "-0.1"], ["--ratio", "1"], ["--ratio", "1.5"], ["--ratio", "nan"], ["--ratio", "inf"],
    ["--ratio", "abc"], ["--ratio"], ["--target-macs", "0"], ["--target-macs", "1.5"], ["--target-macs", "nan"],
    ["--target-params", "0"], ["--target-params", "-1"], ["--target-macs", "0.5", "--target-params", "0.5"],
    ["--max-ratio", "0"], ["--max-ratio", "2"], ["--round-to", "0"], ["--round-to", "-3"], ["--round-to", "x"],
    ["--min-channels", "0"], ["--calib-samples", "0"], ["--sensitivity-samples", "0"], ["--verify-samples", "0"],
    ["--verify-samples", "-1"], ["--seed", "-1"], ["--sparsity", "0"], ["--sparsity", "1"], ["--sparsity", "2"],
    ["--sparse-threads", "0"], ["--importance", "bogus"], ["--importance", ""], ["--scope", "bogus"],
    ["--global-norm", "median"], ["--proxy", "magic"], ["--compensate", "psychic"], ["--sparse-format", "coo"],
    ["--dim", "N=²"], ["--dim", "N=0"], ["--dim", "N=-1"], ["--dim", "=3"], ["--dim", "N"], ["--dim", "N=1e3"],
    ["--dim", "N=99999999999"], ["--dim", "N=３"], ["--bogus-option"], ["--scope", "sensitivity"],
    ["--bn-recalibrate"], ["--calib", "missing.npz", "--importance", "activation"], ["-r"],
]


@pytest.mark.parametrize("args", BAD_OPTIONS, ids=[" ".join(a) for a in BAD_OPTIONS])
def test_bad_option_values(tmp_path, args):
    path = save(conv_model(), tmp_path / "m.onnx")
    run_checked(tmp_path, [path, "-o", tmp_path / "out.onnx", *args])


def test_bad_option_through_the_api():
    for kwargs in ({"importance": "bogus"}, {"verify_samples": 0}, {"ratio": float("nan")}, {"nonsense": 1},
                   {"input_dims": {"N": 0}}, {"exclude": [3]}):
        with pytest.raises(GraphpruneError):
            graphprune.prune(conv_model(), **kwargs)


def test_analyze_bad_options(tmp_path):
    path = save(conv_model(), tmp_path / "m.onnx")
    run_checked(tmp_path, ["analyze", path, "--ratio", "0.5"])
    run_checked(tmp_path, ["analyze"])


# ---- F. --plan-in garbage ------------------------------------------------------------------------------------------

def _plan_text(mutate):
    def build(model_path, tmp_path):
        cli(model_path, "--dry-run", "--plan-out", tmp_path / "good.json")
        data = json.loads((tmp_path / "good.json").read_text())
        (tmp_path / "good.json").unlink()
        mutate(data)
        return json.dumps(data).encode()
    return build


def _first_removed(data):
    g = next(g for g in data["groups"] if g["removed"])
    return g, next(iter(g["removed"]))


PLANS = {
    "random-bytes": lambda m, t: RNG.bytes(300),
    "empty": lambda m, t: b"",
    "latin1": lambda m, t: "plän".encode("latin-1"),
    "list": lambda m, t: b"[]",
    "null": lambda m, t: b"null",
    "number": lambda m, t: b"3",
    "deep": lambda m, t: b"[" * 100000 + b"]" * 100000,
    "version-2": _plan_text(lambda d: d.update(version=2)),
    "groups-not-list": _plan_text(lambda d: d.update(groups={"a": 1})),
    "group-not-object": _plan_text(lambda d: d.update(groups=[1, 2])),
    "group-missing-field": _plan_text(lambda d: d["groups"][0].pop("removed")),
    "group-extra-field": _plan_text(lambda d: d["groups"][0].update(evil=1)),
    "index-negative": _plan_text(lambda d: _first_removed(d)[0]["removed"].update(
        {_first_removed(d)[1]: [-1]})),
    "index-huge": _plan_text(lambda d: _first_removed(d)[0]["removed"].update({_first_removed(d)[1]: [10 ** 12]})),
    "index-string": _plan_text(lambda d: _first_removed(d)[0]["removed"].update({_first_removed(d)[1]: ["0"]})),
    "index-bool": _plan_text(lambda d: _first_removed(d)[0]["removed"].update({_first_removed(d)[1]: [True]})),
    "index-float": _plan_text(lambda d: _first_removed(d)[0]["removed"].update({_first_removed(d)[1]: [0.5]})),
    "key-without-axis": _plan_text(lambda d: _first_removed(d)[0]["removed"].update({"w1": [0]})),
    "unknown-tensor": _plan_text(lambda d: _first_removed(d)[0]["removed"].update({"ghost::0": [0]})),
    "channels-string": _plan_text(lambda d: d["groups"][0].update(channels="8")),
    "scores-strings": _plan_text(lambda d: d["groups"][0].update(scores=["a"])),
    "settings-list": _plan_text(lambda d: d.update(settings=[])),
}


@pytest.mark.parametrize("name", list(PLANS))
def test_plan_in_garbage(tmp_path, name):
    model = save(conv_model(), tmp_path / "m.onnx")
    (tmp_path / "plan.json").write_bytes(PLANS[name](model, tmp_path))
    run_checked(tmp_path, [model, "--plan-in", tmp_path / "plan.json", "-o", tmp_path / "out.onnx"])


@pytest.mark.parametrize("kind", ["fifo", "folder", "dev-zero", "missing"])
def test_plan_in_not_a_regular_file(tmp_path, kind):
    model = save(conv_model(), tmp_path / "m.onnx")
    plan = tmp_path / "plan.json"
    if kind == "fifo":
        os.mkfifo(plan)
    elif kind == "folder":
        plan.mkdir()
    elif kind == "dev-zero":
        os.symlink("/dev/zero", plan)
    run_checked(tmp_path, [model, "--plan-in", plan, "-o", tmp_path / "out.onnx"])


def test_plan_from_json_api_raises_plan_error():
    from graphprune.errors import PlanError
    from graphprune.plan import RewritePlan
    for text in (b"\xff\xfe", "[]", "{", '{"version": 1, "groups": [{"group": 1}]}', 3):
        with pytest.raises(PlanError):
            RewritePlan.from_json(text)


# ---- G. outputs that would destroy inputs ------------------------------------------------------------------------------

def test_output_naming_the_inputs_external_data_is_refused(tmp_path):
    folder, path = _external_model(tmp_path, None)
    run_checked(tmp_path, [path, "-o", folder / "m.onnx.data"], needles=["external data"])


def test_output_whose_data_file_is_the_inputs_data_is_refused(tmp_path):
    folder = tmp_path / "f"
    folder.mkdir()
    path = save_external(conv_model(), folder, name="a.onnx", location="b.onnx.data")
    run_checked(tmp_path, [path, "-o", folder / "b.onnx"], needles=["overwrite"])


@pytest.mark.parametrize("case", ["model", "symlink-to-model", "plan-in", "plan-out-is-model", "plan-out-is-output",
                                  "calib", "inside-calib-folder", "output-is-folder", "no-folder",
                                  "dotdot-to-model"])
def test_outputs_never_overwrite_inputs(tmp_path, case):
    model = save(conv_model(), tmp_path / "m.onnx")
    cli(model, "--dry-run", "--plan-out", tmp_path / "plan.json")
    calib = tmp_path / "calib.npz"
    np.savez(calib, x=np.ones((4, 3, 8, 8), np.float32))
    (tmp_path / "calibdir").mkdir()
    np.save(tmp_path / "calibdir" / "a.npy", np.ones((3, 8, 8), np.float32))
    args = {
        "model": [model, "-o", model],
        "symlink-to-model": [model, "-o", tmp_path / "link.onnx"],
        "plan-in": [model, "--plan-in", tmp_path / "plan.json", "-o", tmp_path / "plan.json"],
        "plan-out-is-model": [model, "-o", tmp_path / "o.onnx", "--plan-out", model],
        "plan-out-is-output": [model, "-o", tmp_path / "o.onnx", "--plan-out", tmp_path / "o.onnx"],
        "calib": [model, "--importance", "activation", "--calib", calib, "-o", calib],
        "inside-calib-folder": [model, "--importance", "activation", "--calib", tmp_path / "calibdir", "-o",
                                tmp_path / "calibdir" / "a.npy"],
        "output-is-folder": [model, "-o", tmp_path / "calibdir"],
        "no-folder": [model, "-o", tmp_path / "nope" / "o.onnx"],
        "dotdot-to-model": [model, "-o", tmp_path / "calibdir" / ".." / "m.onnx"],
    }[case]
    if case == "symlink-to-model":
        os.symlink(model, tmp_path / "link.onnx")
    run_checked(tmp_path, args)


# ---- H. calibration data -------------------------------------------------------------------------------------------

def _npz_with(tmp_path, name, write):
    path = tmp_path / name
    write(path)
    return path


def _pickle_npz(path):
    np.savez(path, x=np.array([{"evil": 1}], dtype=object))


def _bomb_npz(path):
    """An .npz whose member header declares 10^10 floats over a few bytes of data."""
    header = "{'descr': '<f4', 'fortran_order': False, 'shape': (10000000000, 3, 8, 8), }"
    header += " " * (63 - (len(header) + 10) % 64) + "\n"
    blob = b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode() + bytes(64)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", blob)


def _zip_bomb_npz(path):
    """A member that inflates a few KiB to 5 GiB declared."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        info = zipfile.ZipInfo("x.npy")
        z.writestr(info, b"\x93NUMPY" + bytes(1 << 16))
    data = bytearray(path.read_bytes())
    # patch the uncompressed size in the central directory and the local header to 5 GiB (zip64 not needed
    # to show intent: 0xFFFFFFF0 is ~4 GiB)
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):
        pos = data.find(sig)
        off = 22 if sig == b"PK\x03\x04" else 24
        data[pos + off:pos + off + 4] = struct.pack("<I", 0xFFFFFFF0)
    path.write_bytes(bytes(data))


CALIB = {
    "pickle": ("c.npz", _pickle_npz, "unpickling"),
    "missing-key": ("c.npz", lambda p: np.savez(p, other=np.ones((4, 3, 8, 8), np.float32)), "no array"),
    "wrong-rank": ("c.npz", lambda p: np.savez(p, x=np.ones((4, 3), np.float32)), "dims"),
    "strings": ("c.npz", lambda p: np.savez(p, x=np.array(["a", "b"])), "dtype"),
    "not-a-zip": ("c.npz", lambda p: p.write_bytes(b"hello"), "npz"),
    "header-bomb": ("c.npz", _bomb_npz, "header"),
    "zip-bomb": ("c.npz", _zip_bomb_npz, ""),
    "scalar": ("c.npz", lambda p: np.savez(p, x=np.float32(1)), ""),
    "unknown-suffix": ("c.txt", lambda p: p.write_text("1 2 3"), "expected"),
}


@pytest.mark.parametrize("name", list(CALIB))
def test_calibration_files(tmp_path, name):
    fname, write, needle = CALIB[name]
    model = save(conv_model(), tmp_path / "m.onnx")
    calib = _npz_with(tmp_path, fname, write)
    run_checked(tmp_path, [model, "--importance", "activation", "--calib", calib, "-o", tmp_path / "o.onnx"],
                needles=[needle] if needle else [])


def _png(width, height, payload=b""):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(payload)) + chunk(b"IEND", b"")


@pytest.mark.parametrize("kind", ["bomb-image", "corrupt-image", "pickled-npy", "mixed-shapes", "fifo-npy",
                                  "npy-header-bomb"])
def test_calibration_folders(tmp_path, kind):
    pytest.importorskip("PIL")
    model = save(conv_model(), tmp_path / "m.onnx")
    folder = tmp_path / "calib"
    folder.mkdir()
    if kind == "bomb-image":
        (folder / "a.png").write_bytes(_png(100000, 100000, bytes(1000)))
    elif kind == "corrupt-image":
        (folder / "a.png").write_bytes(b"\x89PNG\r\n\x1a\n" + RNG.bytes(200))
    elif kind == "pickled-npy":
        np.save(folder / "a.npy", np.array([{"evil": 1}], dtype=object), allow_pickle=True)
    elif kind == "mixed-shapes":
        np.save(folder / "a.npy", np.ones((3, 8, 8), np.float32))
        np.save(folder / "b.npy", np.ones((3, 4, 4), np.float32))
    elif kind == "fifo-npy":
        os.mkfifo(folder / "a.npy")
    elif kind == "npy-header-bomb":
        _bomb_npz(tmp_path / "tmp.zip")
        with zipfile.ZipFile(tmp_path / "tmp.zip") as z:
            (folder / "a.npy").write_bytes(z.read("x.npy"))
        (tmp_path / "tmp.zip").unlink()
    run_checked(tmp_path, [model, "--importance", "activation", "--calib", folder, "-o", tmp_path / "o.onnx"])
