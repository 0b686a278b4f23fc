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
        for t in model.graph.initializer:
            model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
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
                             [helper.make_tensor_value_info("t", TensorProto.FLOAT, [1])])
    m = conv_model(extra_nodes=[helper.make_node("If", ["c"], ["o2"], name="if", then_branch=then, else_branch=then)],
                   extra_inits={"c": np.array(True)},
                   extra_outputs=[helper.make_tensor_value_info("o2", TensorProto.FLOAT, [1])])
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
    # onnx accepts unknown future opsets; ops onnx does not know may be onnxruntime's: the analysis may run
    if name in ("opset-99", "conv-weight-rank-2", "unknown-op") and command == "analyze":
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


# ---- G. outputs that would destroy inputs ----------------------------------------------------------------------------

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
                                  "dotdot-to-model", "hardlink-to-model", "hardlink-to-data"])
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
        "hardlink-to-model": [model, "-o", tmp_path / "hard.onnx"],
        "hardlink-to-data": [tmp_path / "ext" / "m.onnx", "-o", tmp_path / "hard.onnx"],
    }[case]
    if case == "hardlink-to-model":
        os.link(model, tmp_path / "hard.onnx")
    if case == "hardlink-to-data":
        (tmp_path / "ext").mkdir()
        save_external(conv_model(), tmp_path / "ext")
        os.link(tmp_path / "ext" / "m.onnx.data", tmp_path / "hard.onnx")
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


# ---- I. huge declared dims: bounded memory (a subprocess under RLIMIT_AS) --------------------------------------------

def _big_models(folder: Path) -> list[Path]:
    big = 10 ** 9
    out = []

    def graph_model(name, nodes, inputs, outputs, inits=()):
        g = helper.make_graph(nodes, name, inputs, outputs, list(inits))
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
        m.ir_version = 8
        out.append(save(m, folder / f"{name}.onnx"))

    for name, shape in (("batch", [big, 3, 8, 8]), ("spatial", [1, 3, big, 8]), ("both", [big, 3, 8, big])):
        m = conv_model(x_shape=shape)
        out.append(save(m, folder / f"{name}.onnx"))
    vi = helper.make_tensor_value_info
    graph_model("reshape", [helper.make_node("Reshape", ["x", "s"], ["r"], name="rs"),
                            helper.make_node("Relu", ["r"], ["y"], name="relu")],
                [vi("x", 1, ["n"])], [vi("y", 1, [1, big])], [numpy_helper.from_array(np.array([1, big]), "s")])
    graph_model("constantofshape", [helper.make_node("ConstantOfShape", ["s"], ["c"], name="cos"),
                                    helper.make_node("Add", ["x", "c"], ["y"], name="add")],
                [vi("x", 1, [1, big])], [vi("y", 1, [1, big])], [numpy_helper.from_array(np.array([1, big]), "s")])
    graph_model("expand", [helper.make_node("Expand", ["one", "s"], ["c"], name="ex"),
                           helper.make_node("Mul", ["x", "c"], ["y"], name="mul")],
                [vi("x", 1, [big, big])], [vi("y", 1, [big, big])],
                [numpy_helper.from_array(np.array([big, big]), "s"), numpy_helper.from_array(np.ones(1, np.float32),
                                                                                              "one")])
    graph_model("range", [helper.make_node("Range", ["a", "b", "d"], ["c"], name="range"),
                          helper.make_node("Cast", ["c"], ["y"], name="cast", to=1)],
                [vi("x", 1, [1])], [vi("y", 1, [big])],
                [numpy_helper.from_array(np.array(0, np.int64), "a"), numpy_helper.from_array(np.array(big), "b"),
                 numpy_helper.from_array(np.array(1, np.int64), "d")])
    graph_model("tile", [helper.make_node("Tile", ["one", "s"], ["c"], name="tile"),
                         helper.make_node("Add", ["x", "c"], ["y"], name="add")],
                [vi("x", 1, [big])], [vi("y", 1, [big])],
                [numpy_helper.from_array(np.array([big]), "s"), numpy_helper.from_array(np.ones(1, np.float32),
                                                                                         "one")])
    graph_model("matmul-1e9", [helper.make_node("MatMul", ["x", "w"], ["h"], name="mm"),
                               helper.make_node("Relu", ["h"], ["y"], name="relu")],
                [vi("x", 1, [1, 4])], [vi("y", 1, [1, big])], [numpy_helper.from_array(_w(4, 4), "w")])
    return out


_BOUNDED_RUNNER = r"""
import json, resource, signal, sys
resource.setrlimit(resource.RLIMIT_AS, (__LIMIT__, __LIMIT__))
signal.alarm(120)
from click.testing import CliRunner
from graphprune.cli import main
def peak_kb():
    # VmHWM belongs to this process image (ru_maxrss survives exec: it would count the forking pytest's RSS)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
results = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(main, args)
    results.append({"args": args, "code": r.exit_code, "stderr": r.stderr, "exc": repr(r.exception),
                    "maxrss_kb": peak_kb()})
results.append({"maxrss_kb": peak_kb()})
print(json.dumps(results))
"""


def test_huge_declared_dims_stay_within_a_memory_bound(tmp_path):
    models = _big_models(tmp_path)
    runs = []
    for m in models:
        runs.append(["analyze", str(m)])
        runs.append(["prune", str(m), "-o", str(tmp_path / f"out-{m.stem}.onnx")])
    limit = 3 << 30
    proc = subprocess.run([sys.executable, "-c", _BOUNDED_RUNNER.replace("__LIMIT__", str(limit)), json.dumps(runs)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results[-1]["maxrss_kb"] < 1_500_000, [(r.get("args"), r["maxrss_kb"]) for r in results]
    for r in results[:-1]:
        assert r["code"] in (0, 2), r
        if r["code"] == 2:
            lines = r["stderr"].splitlines()
            assert len(lines) == 1 and lines[0].startswith("error:"), r
            assert "out of memory" not in lines[0] and "MemoryError" not in lines[0], r
    # the declared-but-impossible inputs are refused with the dims they declare
    by_args = {tuple(r["args"][:2]): r for r in results[:-1]}
    assert "1000000000" in by_args[("prune", str(tmp_path / "batch.onnx"))]["stderr"]


def test_big_dims_are_unknown_to_the_analysis():
    from graphprune.ir import MAX_STATIC_DIM, Graph
    g = Graph(conv_model(x_shape=[1, 3, 10 ** 9, 8]))
    g.infer_shapes()
    assert g.shape("x")[2] is None and g.shape("h")[2] is None
    assert all(d is None or d <= MAX_STATIC_DIM for s in g.shapes.values() for d in s)


# ---- J. classical ONNX-ML -------------------------------------------------------------------------------------------

def _tree_ensemble(n_nodes=200_000):
    ids = np.arange(n_nodes)
    leaf = ids >= n_nodes // 2
    node = helper.make_node(
        "TreeEnsembleClassifier", ["x"], ["label", "probabilities"], domain="ai.onnx.ml", name="trees",
        nodes_treeids=[0] * n_nodes, nodes_nodeids=ids.tolist(), nodes_featureids=(ids % 4).tolist(),
        nodes_values=np.linspace(0, 1, n_nodes).tolist(),
        nodes_modes=["LEAF" if is_leaf else "BRANCH_LEQ" for is_leaf in leaf],
        nodes_truenodeids=np.minimum(2 * ids + 1, n_nodes - 1).tolist(),
        nodes_falsenodeids=np.minimum(2 * ids + 2, n_nodes - 1).tolist(),
        class_treeids=[0] * (n_nodes // 2), class_nodeids=ids[leaf].tolist(), class_ids=(ids[leaf] % 2).tolist(),
        class_weights=[1.0] * (n_nodes // 2), classlabels_int64s=[0, 1])
    g = helper.make_graph([node], "trees", [helper.make_tensor_value_info("x", 1, ["N", 4])],
                          [helper.make_tensor_value_info("label", TensorProto.INT64, ["N"]),
                           helper.make_tensor_value_info("probabilities", 1, ["N", 2])])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])
    m.ir_version = 8
    return m


def test_classical_onnx_ml_is_recognised_at_once(tmp_path):
    import time
    path = save(_tree_ensemble(), tmp_path / "trees.onnx")
    start = time.perf_counter()
    for args in (["analyze", path], [path, "-o", tmp_path / "o.onnx"]):
        run_checked(tmp_path, args, needles=["ONNX-ML", "TreeEnsembleClassifier"])
    assert time.perf_counter() - start < 10
    from graphprune.errors import UnsupportedModelError
    with pytest.raises(UnsupportedModelError):
        graphprune.prune(str(path), ratio=0.5)


# ---- K. names are data -----------------------------------------------------------------------------------------------

NAMES = {
    "markup": "[bold red]w[/bold red]",
    "ansi": "\x1b[31mred\x1b[0m",
    "newline": "a\nb",
    "carriage-return": "a\rb",
    "format": "%s{0}{x}",
    "unicode": "名前✓",
    "rtl-override": "a\u202eb",
    "backslash": "a\\nb",
}


@pytest.mark.parametrize("kind", list(NAMES))
def test_names_with_markup_and_escapes(tmp_path, kind):
    name = NAMES[kind]
    m = conv_model(names=("x", name + "_w1", name + "_h", "r", "w2", "y"),
                   node_names=(name + "_conv1", "relu", "conv2"))
    path = save(m, tmp_path / "m.onnx")
    result = cli(path, "-o", tmp_path / "o.onnx", "-v")
    assert result.exit_code == 0, result.output
    assert "\x1b" not in result.output and "\u202e" not in result.output
    assert_error_or_valid(result, tmp_path / "o.onnx")
    result = cli("analyze", path, "-v")
    assert result.exit_code == 0 and "\x1b" not in result.output
    # an error about such a name is still one line
    bad = conv_model(names=("x", name + "_w1", name + "_h", "r", "w2", "y"))
    bad.graph.initializer.append(numpy_helper.from_array(_w(8, 3, 3, 3), name + "_w1"))
    run_checked(tmp_path, [save(bad, tmp_path / "bad.onnx"), "-o", tmp_path / "o2.onnx"])


@pytest.mark.parametrize("fname", ["\x1b[31mm.onnx", "m\nx.onnx", "[red]m[/red].onnx"])
def test_file_names_with_escapes(tmp_path, fname):
    run_checked(tmp_path, [tmp_path / fname])  # missing: one line, escapes shown as text


# ---- L. every element type ------------------------------------------------------------------------------------------

DTYPES = {
    "float": (TensorProto.FLOAT, np.float32), "double": (TensorProto.DOUBLE, np.float64),
    "float16": (TensorProto.FLOAT16, np.float16), "bfloat16": (TensorProto.BFLOAT16, None),
    "int8": (TensorProto.INT8, np.int8), "uint8": (TensorProto.UINT8, np.uint8),
    "int16": (TensorProto.INT16, np.int16), "uint16": (TensorProto.UINT16, np.uint16),
    "int32": (TensorProto.INT32, np.int32), "int64": (TensorProto.INT64, np.int64),
    "uint32": (TensorProto.UINT32, np.uint32), "uint64": (TensorProto.UINT64, np.uint64),
    "bool": (TensorProto.BOOL, np.bool_), "string": (TensorProto.STRING, object),
    "complex64": (TensorProto.COMPLEX64, np.complex64), "float8e4m3fn": (TensorProto.FLOAT8E4M3FN, None),
    "int4": (TensorProto.INT4, None), "uint4": (TensorProto.UINT4, None),
}
EXOTIC = {"complex64", "float8e4m3fn", "int4", "uint4", "bfloat16"}


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_every_dtype(tmp_path, dtype):
    """A constant and an input of each element type pass through Identity next to the prunable path."""
    elem, np_type = DTYPES[dtype]
    if np_type is None:
        const = helper.make_tensor("k", elem, [2], [1, 0])
    elif np_type is object:
        const = numpy_helper.from_array(np.array(["a", "b"], dtype=object), "k")
    else:
        const = numpy_helper.from_array(np.array([1, 0], dtype=np_type), "k")
    m = conv_model(opset=21, extra_nodes=[helper.make_node("Identity", ["k"], ["k_out"], name="ident"),
                                          helper.make_node("Identity", ["t_in"], ["t_out"], name="ident2")],
                   extra_outputs=[helper.make_tensor_value_info("k_out", elem, [2]),
                                  helper.make_tensor_value_info("t_out", elem, ["N", 2])])
    m.graph.initializer.append(const)
    m.graph.input.append(helper.make_tensor_value_info("t_in", elem, ["N", 2]))
    path = save(m, tmp_path / "m.onnx")
    result = run_checked(tmp_path, [path, "-o", tmp_path / "o.onnx"], allowed={"o.onnx"}, expect_error=False)
    if dtype in EXOTIC:
        assert_error_or_valid(result, tmp_path / "o.onnx")
        if dtype in ("bfloat16", "float8e4m3fn"):
            assert "cannot be fed" in result.stderr and "--no-verify" in result.stderr
    else:
        assert result.exit_code == 0, result.output
        assert_error_or_valid(result, tmp_path / "o.onnx")


def test_float16_model_verifies_on_a_float16_tolerance(tmp_path):
    h = np.float16
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "fp16", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 64])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 8])],
                          [numpy_helper.from_array(_w(64, 256).astype(h) * 4, "w1"),
                           numpy_helper.from_array(_w(256, 8).astype(h) * 4, "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    pruned, report = graphprune.prune(m, ratio=0.5, verify_samples=4, compensate="none")
    assert report.verification["rtol"] >= 1e-3  # not float32's 1e-4
    onnx.checker.check_model(pruned, full_check=True)


# ---- M. opsets 7-23 --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("opset", range(7, 24))
def test_every_opset(opset):
    ir = onnx.helper.find_min_ir_version_for([helper.make_opsetid("", opset)])
    m = conv_model(opset=opset, ir=ir)
    onnx.checker.check_model(m)
    pruned, report = graphprune.prune(m, ratio=0.5)
    onnx.checker.check_model(pruned, full_check=True)
    assert pruned.ir_version == ir and pruned.opset_import[0].version == opset
    assert report.params_after < report.params_before and report.verification["compared"] == ["y"]
    if ir < 4:  # initializers still listed as inputs, with their pruned shapes
        listed = {i.name: [d.dim_value for d in i.type.tensor_type.shape.dim] for i in pruned.graph.input}
        for t in pruned.graph.initializer:
            assert listed[t.name] == list(t.dims)


def test_ir3_model_through_the_cli(tmp_path):
    path = save(conv_model(opset=7, ir=3), tmp_path / "m.onnx")
    result = cli(path, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.output
    assert_error_or_valid(result, tmp_path / "o.onnx")


# ---- N. control flow -------------------------------------------------------------------------------------------------

def _control_flow(kind):
    vi = helper.make_tensor_value_info
    if kind == "If":
        def branch(op):
            return helper.make_graph([helper.make_node(op, ["r"], ["b"], name=f"{op}_b")], op, [],
                                     [vi("b", 1, None)])

        extra = [helper.make_node("If", ["cond"], ["cf"], name="if", then_branch=branch("Relu"),
                                  else_branch=branch("Sigmoid"))]
        inits = {"cond": np.array(True)}
    elif kind == "Loop":
        body = helper.make_graph([helper.make_node("Identity", ["c_in"], ["c_out"], name="lc"),
                                  helper.make_node("Add", ["acc_in", "r"], ["acc_out"], name="la")], "body",
                                 [vi("i", TensorProto.INT64, []), vi("c_in", TensorProto.BOOL, []),
                                  vi("acc_in", 1, None)], [vi("c_out", TensorProto.BOOL, []), vi("acc_out", 1, None)])
        extra = [helper.make_node("Loop", ["trip", "cond", "r"], ["cf"], name="loop", body=body)]
        inits = {"cond": np.array(True), "trip": np.array(2, np.int64)}
    else:
        body = helper.make_graph([helper.make_node("Add", ["s_in", "e"], ["s_out"], name="sa"),
                                  helper.make_node("Identity", ["s_out"], ["e_out"], name="si")], "body",
                                 [vi("s_in", 1, [8, 8]), vi("e", 1, [8, 8])], [vi("s_out", 1, [8, 8]),
                                                                              vi("e_out", 1, [8, 8])])
        extra = [helper.make_node("Squeeze", ["r", "ax"], ["r3"], name="sq"),
                 helper.make_node("Scan", ["init", "r3"], ["cf", "scan_out"], name="scan", body=body,
                                  num_scan_inputs=1)]
        inits = {"init": np.zeros((8, 8), np.float32), "ax": np.array([0], np.int64)}
    return conv_model(x_shape=(1, 3, 8, 8), extra_nodes=extra, extra_inits=inits,
                      extra_outputs=[vi("cf", 1, None)])


@pytest.mark.parametrize("kind", ["If", "Loop", "Scan"])
def test_control_flow(tmp_path, kind):
    m = _control_flow(kind)
    m.graph.output[-1].type.tensor_type.shape.SetInParent()
    path = save(m, tmp_path / "m.onnx")
    result = run_checked(tmp_path, [path, "-o", tmp_path / "o.onnx"], allowed={"o.onnx"}, expect_error=False)
    assert_error_or_valid(result, tmp_path / "o.onnx")


# ---- O. writes: atomic, unique temp files, SIGTERM, modes, planted symlinks ----------------------------------------

def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp"))


def test_sigterm_during_a_save_cleans_up_and_keeps_the_old_output(tmp_path, monkeypatch):
    from graphprune import fileio
    from graphprune.ir import save_model
    out = tmp_path / "o.onnx"
    save_model(conv_model(), out, external_data=True)
    before = snapshot(tmp_path)
    real_open = fileio.TempFile.open

    def open_then_die(self, mode="wb"):  # SIGTERM once the data file is written, while the model is
        if self.dest.name == "o.onnx":
            os.kill(os.getpid(), signal.SIGTERM)
        return real_open(self, mode)

    monkeypatch.setattr(fileio.TempFile, "open", open_then_die)
    with pytest.raises(Terminated):
        save_model(conv_model(opset=13), out, external_data=True)
    assert snapshot(tmp_path) == before and not _leftovers(tmp_path)
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or not callable(
        signal.getsignal(signal.SIGTERM)) or signal.getsignal(signal.SIGTERM).__name__ != "handler"


def test_sigterm_in_the_cli_is_one_line_and_leaves_nothing(tmp_path, monkeypatch):
    from graphprune import fileio
    model = save(conv_model(), tmp_path / "m.onnx")

    def die(self):
        raise Terminated("terminated by SIGTERM")

    monkeypatch.setattr(fileio.TempFile, "commit", die)
    run_checked(tmp_path, [model, "-o", tmp_path / "o.onnx", "--plan-out", tmp_path / "p.json"],
                needles=["SIGTERM"])


def test_sigterm_to_a_real_process_mid_save(tmp_path):
    """A subprocess saving a 64 MB model gets SIGTERM: it exits, no temp file stays, no partial output."""
    script = (
        "import numpy as np, sys, os\n"
        "from onnx import helper, numpy_helper\n"
        "from graphprune.ir import save_model\n"
        "w = [numpy_helper.from_array(np.ones((1 << 20,), np.float32), f'w{i}') for i in range(16)]\n"
        "g = helper.make_graph([], 'g', [], [helper.make_tensor_value_info('w0', 1, [1 << 20])], w)\n"
        "m = helper.make_model(g)\n"
        "print('ready', flush=True)\n"
        "while True:\n"
        "    save_model(m, sys.argv[1], external_data=True)\n")
    proc = subprocess.Popen([sys.executable, "-c", script, str(tmp_path / "o.onnx")], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "ready"
    import time
    time.sleep(0.8)
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    assert proc.returncode != 0
    assert not _leftovers(tmp_path), _leftovers(tmp_path)
    if (tmp_path / "o.onnx").exists():  # a completed earlier save: whole and loadable
        m = onnx.load(str(tmp_path / "o.onnx"))
        assert len(m.graph.initializer) == 16


def test_concurrent_saves_to_one_path(tmp_path):
    from graphprune.ir import save_model
    out = tmp_path / "o.onnx"
    errors = []

    def worker(opset):
        try:
            for _ in range(5):
                save_model(conv_model(opset=opset), out, external_data=True)
        except Exception as exc:  # pragma: no cover - the failure being tested for
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(op,)) for op in (13, 17)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and not _leftovers(tmp_path)
    onnx.checker.check_model(str(out), full_check=True)


def test_stale_temp_files_are_neither_used_nor_deleted(tmp_path):
    from graphprune.ir import save_model
    stale = [tmp_path / ".o.onnx.data.tmp", tmp_path / ".o.onnx.abc123.tmp"]
    for s in stale:
        s.write_text("someone else's")
    save_model(conv_model(), tmp_path / "o.onnx", external_data=True)
    assert all(s.read_text() == "someone else's" for s in stale)
    onnx.checker.check_model(str(tmp_path / "o.onnx"), full_check=True)


def test_failed_save_removes_only_its_own_temp_files(tmp_path, monkeypatch):
    from graphprune.ir import save_model
    (tmp_path / ".o.onnx.data.tmp").write_text("not mine")
    (tmp_path / "o.onnx").write_bytes(b"previous")
    model = conv_model()
    monkeypatch.setattr(onnx.ModelProto, "SerializeToString", lambda self: (_ for _ in ()).throw(OSError(28, "full")))
    with pytest.raises(OSError):
        save_model(model, tmp_path / "o.onnx", external_data=True)
    monkeypatch.undo()
    assert (tmp_path / ".o.onnx.data.tmp").read_text() == "not mine"
    assert (tmp_path / "o.onnx").read_bytes() == b"previous"
    assert _leftovers(tmp_path) == [".o.onnx.data.tmp"]
    # the caller's model is unchanged (weights moved out for writing are restored)
    assert all(t.data_location == TensorProto.DEFAULT and t.raw_data for t in model.graph.initializer)


@pytest.mark.parametrize("umask,existing,expected", [(0o022, None, 0o644), (0o077, None, 0o600),
                                                     (0o022, 0o640, 0o640), (0o002, None, 0o664)])
def test_output_modes_follow_open(tmp_path, umask, existing, expected):
    model = save(conv_model(), tmp_path / "m.onnx")
    outputs = [tmp_path / "o.onnx", tmp_path / "p.json"]
    if existing is not None:
        for p in outputs:
            p.write_text("old")
            os.chmod(p, existing)
    old = os.umask(umask)
    try:
        result = cli(model, "-o", outputs[0], "--plan-out", outputs[1])
    finally:
        os.umask(old)
    assert result.exit_code == 0, result.output
    for p in outputs:
        assert stat.S_IMODE(p.stat().st_mode) == expected, (p, oct(p.stat().st_mode))


@pytest.mark.parametrize("planted", ["o.onnx", "o.onnx.data", ".o.onnx.data.tmp", "p.json"])
def test_planted_symlinks_are_replaced_not_followed(tmp_path, planted):
    from graphprune.ir import save_model
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    os.symlink(victim, tmp_path / planted)
    model = save(conv_model(), tmp_path / "m.onnx")
    if planted == "o.onnx.data":
        save_model(conv_model(), tmp_path / "o.onnx", external_data=True)
    else:
        result = cli(model, "-o", tmp_path / "o.onnx", "--plan-out", tmp_path / "p.json")
        assert result.exit_code == 0, result.output
    assert victim.read_text() == "precious"
    if planted != ".o.onnx.data.tmp":
        assert not (tmp_path / planted).is_symlink()


# ---- P. random verification inputs follow the graph ------------------------------------------------------------------

def test_paddle_minus_one_dim(tmp_path):
    m = conv_model()
    m.graph.input[0].type.tensor_type.shape.dim[0].Clear()
    m.graph.input[0].type.tensor_type.shape.dim[0].dim_value = -1
    pruned, report = graphprune.prune(m, ratio=0.5)
    assert report.verification["compared"]


def test_one_value_per_dim_name():
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("MatMul", ["b", "a"], ["ab"], name="mm0"),
             helper.make_node("MatMul", ["ab", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "names", [vi("a", 1, ["N", 8]), vi("b", 1, [4, "N"])], [vi("y", 1, [4, 4])],
                          [numpy_helper.from_array(_w(8, 16), "w1"), numpy_helper.from_array(_w(16, 4), "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    pruned, report = graphprune.prune(m, ratio=0.5)
    assert report.verification["compared"] == ["y"]


def test_feature_axis_fixed_by_a_gru_weight():
    vi = helper.make_tensor_value_info
    hidden, feat = 16, 24
    nodes = [helper.make_node("GRU", ["x", "W", "R"], ["Y", "Y_h"], name="gru", hidden_size=hidden),
             helper.make_node("Squeeze", ["Y_h", "ax"], ["hs"], name="sq"),
             helper.make_node("MatMul", ["hs", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "gru", [vi("x", 1, ["T", "N", "F"])], [vi("y", 1, ["N", 4])],
                          [numpy_helper.from_array(_w(1, 3 * hidden, feat), "W"),
                           numpy_helper.from_array(_w(1, 3 * hidden, hidden), "R"),
                           numpy_helper.from_array(np.array([0], np.int64), "ax"),
                           numpy_helper.from_array(_w(hidden, 32), "w1"), numpy_helper.from_array(_w(32, 4), "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    from graphprune.feeds import feed_shapes
    from graphprune.ir import Graph
    shapes, dims = feed_shapes(Graph(m))
    assert shapes["x"][2] == feat and dims["F"] == feat
    pruned, report = graphprune.prune(m, ratio=0.5)
    assert report.verification["compared"] == ["y"]


def test_raw_audio_input_is_long_enough_for_the_kernel():
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Unsqueeze", ["wave", "ax"], ["w3"], name="unsq"),
             helper.make_node("Conv", ["w3", "k1"], ["h"], name="conv1", strides=[160]),
             helper.make_node("Relu", ["h"], ["r"]), helper.make_node("Conv", ["r", "k2"], ["y"], name="conv2",
                                                                      kernel_shape=[3])]
    g = helper.make_graph(nodes, "audio", [vi("wave", 1, ["N", "T"])], [vi("y", 1, ["N", 4, "F"])],
                          [numpy_helper.from_array(np.array([1], np.int64), "ax"),
                           numpy_helper.from_array(_w(8, 1, 512), "k1"), numpy_helper.from_array(_w(4, 8, 3), "k2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    from graphprune.feeds import feed_shapes
    from graphprune.ir import Graph
    shapes, _ = feed_shapes(Graph(m))
    assert shapes["wave"][1] >= 512 + 2 * 160
    pruned, report = graphprune.prune(m, ratio=0.5)
    assert report.verification["compared"] == ["y"]


def test_unrunnable_random_inputs_name_the_dims(tmp_path):
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("Reshape", ["x", "s"], ["xr"], name="rs"),
             helper.make_node("MatMul", ["xr", "w1"], ["h"], name="mm1"), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2")]
    g = helper.make_graph(nodes, "rs", [vi("x", 1, ["L"])], [vi("y", 1, [1, 4])],
                          [numpy_helper.from_array(np.array([1, 96]), "s"), numpy_helper.from_array(_w(96, 16), "w1"),
                           numpy_helper.from_array(_w(16, 4), "w2")])
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    path = save(m, tmp_path / "m.onnx")
    run_checked(tmp_path, [path, "-o", tmp_path / "o.onnx"], needles=["--dim", "L=1"])
    result = cli(path, "-o", tmp_path / "o.onnx", "--dim", "L=96")
    assert result.exit_code == 0, result.output


# ---- Q. verification that proves nothing -----------------------------------------------------------------------------

def test_zero_head_is_verified_on_the_tensor_feeding_it(tmp_path):
    m = conv_model()
    m.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.zeros((4, 8, 1, 1), np.float32), "w2"))
    path = save(m, tmp_path / "m.onnx")
    result = cli(path, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.output
    assert "verified" in result.stdout and "at tensor 'r'" in result.stdout and "all zero" in result.stdout


def test_nan_outputs_are_not_evidence():
    m = conv_model(extra_nodes=[helper.make_node("Div", ["y", "zero"], ["yn"], name="div")],
                   extra_inits={"zero": np.zeros(1, np.float32)},
                   extra_outputs=[])
    m.graph.output[0].name = "yn"
    pruned, report = graphprune.prune(m, ratio=0.5)
    v = report.verification
    assert v["degenerate"] == {"yn": "NaN/Inf"} and v["compared"] == ["y"] and v["intermediate"]


def test_nothing_to_compare_is_not_verified(tmp_path):
    m = conv_model(extra_nodes=[helper.make_node("Mul", ["x0", "zeros"], ["x"], name="kill")],
                   extra_inits={"zeros": np.zeros(1, np.float32)}, names=("x", "w1", "h", "r", "w2", "y"))
    m.graph.input[0].name = "x0"
    nodes = list(m.graph.node)
    del m.graph.node[:]
    m.graph.node.extend([nodes[-1]] + nodes[:-1])
    path = save(m, tmp_path / "m.onnx")
    result = cli(path, "-o", tmp_path / "o.onnx")
    assert result.exit_code == 0, result.output
    assert "not verified" in result.stdout
    assert not any(line.startswith("verified") for line in result.stdout.splitlines())


def test_sigterm_between_the_two_renames_is_held_back(tmp_path, monkeypatch):
    """The model and its data file are replaced together: SIGTERM after the data rename waits for the model's."""
    from graphprune import fileio
    from graphprune.ir import save_model
    out = tmp_path / "o.onnx"
    real_commit = fileio.TempFile.commit
    calls = []

    def commit(self):
        real_commit(self)
        calls.append(self.dest.name)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(fileio.TempFile, "commit", commit)
    with pytest.raises(Terminated):
        save_model(conv_model(), out, external_data=True)
    assert calls == ["o.onnx.data", "o.onnx"] and not _leftovers(tmp_path)
    onnx.checker.check_model(str(out), full_check=True)


# ---- R. nesting, and the API never raises anything but GraphpruneError -------------------------------------------

def _leaf_branch():
    return helper.make_graph([helper.make_node("Identity", ["r"], ["o"], name="leaf")], "leaf", [],
                             [helper.make_tensor_value_info("o", 1, [1, 8, 8, 8])])


def test_nested_ifs_prune(tmp_path):
    g = _leaf_branch()
    for k in range(25):
        node = helper.make_node("If", ["cond"], ["o"], name=f"if{k}", then_branch=g, else_branch=_leaf_branch())
        g = helper.make_graph([node], f"g{k}", [], [helper.make_tensor_value_info("o", 1, [1, 8, 8, 8])])
    m = conv_model(x_shape=(1, 3, 8, 8), extra_nodes=list(g.node), extra_inits={"cond": np.array(True)},
                   extra_outputs=[helper.make_tensor_value_info("o", 1, [1, 8, 8, 8])])
    path = save(m, tmp_path / "m.onnx")
    result = cli(path, "-o", tmp_path / "o.onnx")
    assert_error_or_valid(result, tmp_path / "o.onnx")


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field, encoded by hand (protobuf's own encoder refuses this depth)."""
    def varint(n):
        out = b""
        while True:
            byte, n = n & 0x7F, n >> 7
            out += bytes([byte | (0x80 if n else 0)])
            if not n:
                return out
    return varint(number << 3 | 2) + varint(len(payload)) + payload


def test_nesting_deeper_than_protobuf_allows(tmp_path):
    graph = _field(2, b"leaf")
    for _ in range(200):  # GraphProto.node -> NodeProto.attribute -> AttributeProto.g -> GraphProto ...
        attribute = _field(1, b"then_branch") + _field(6, graph) + b"\xa0\x01\x05"  # type = GRAPH
        node = _field(4, b"If") + _field(5, attribute)
        graph = _field(1, node)
    model = b"\x08\x08" + _field(7, graph) + _field(8, b"\x10\x11")
    path = tmp_path / "deep.onnx"
    path.write_bytes(model)
    for args in (["analyze", path], [path, "-o", tmp_path / "o.onnx"]):
        run_checked(tmp_path, args)


@pytest.mark.parametrize("name", list(INVALID))
def test_api_raises_only_graphprune_errors(name):
    model = INVALID[name][0]()
    for call in (lambda: graphprune.analyze_model(model), lambda: graphprune.prune(model, ratio=0.5)):
        try:
            call()
        except GraphpruneError:
            pass


def test_names_that_are_not_utf8_are_refused_at_load(tmp_path):
    data = bytearray(conv_model(node_names=("cønv1", "relu", "conv2")).SerializeToString())
    pos = data.find("cønv1".encode())
    data[pos + 1] = 0xFF  # breaks the two-byte sequence of 'ø'
    path = tmp_path / "m.onnx"
    path.write_bytes(bytes(data))
    for args in (["analyze", path], [path, "-o", tmp_path / "o.onnx"]):
        run_checked(tmp_path, args, needles=["UTF-8"])


def test_declared_shape_contradicting_the_graph_is_refused(tmp_path):
    m = conv_model(x_shape=(1, 3, 8, 8), y_shape=[1, 5, 8, 8])  # conv2 has 4 output channels, not 5
    path = save(m, tmp_path / "m.onnx")
    for args in (["analyze", path], [path, "-o", tmp_path / "o.onnx"]):
        run_checked(tmp_path, args, needles=["contradicts"])


@pytest.mark.parametrize("kind", ["fifo", "garbage", "deep"])
def test_sparse_plan_in_hostile(tmp_path, kind):
    model = save(conv_model(), tmp_path / "m.onnx")
    plan = tmp_path / "sp.json"
    if kind == "fifo":
        os.mkfifo(plan)
    elif kind == "garbage":
        plan.write_bytes(RNG.bytes(500))
    else:
        plan.write_bytes(b"[" * 100000 + b"]" * 100000)
    run_checked(tmp_path, [model, "--sparsity", "0.5", "--sparse-plan-in", plan, "-o", tmp_path / "o.onnx"])
