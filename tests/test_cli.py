"""CLI behaviour through click's runner: outputs, plans, and one-line errors with no partial files."""
import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

from graphprune.cli import main

MODEL = Path(__file__).resolve().parents[1] / "models" / "mnist_cnn.onnx"


@pytest.fixture()
def model(tmp_path):
    path = tmp_path / "mnist.onnx"
    shutil.copy(MODEL, path)
    return path


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_prune_writes_default_output_beside_input(model):
    result = run(model, "--ratio", "0.5")
    assert result.exit_code == 0, result.output
    out = model.with_name("mnist.pruned.onnx")
    assert out.exists()
    onnx.checker.check_model(onnx.load(str(out)), full_check=True)
    assert "verified" in result.output and "MACs" in result.output
    assert sorted(p.name for p in model.parent.iterdir()) == ["mnist.onnx", "mnist.pruned.onnx"]


def test_explicit_prune_subcommand_and_output(model, tmp_path):
    out = tmp_path / "small.onnx"
    result = run("prune", model, "-r", "0.25", "-o", out, "-v")
    assert result.exit_code == 0, result.output
    assert out.exists() and "per layer MACs" in result.output


def test_dry_run_plan_out_and_replay(model, tmp_path):
    plan = tmp_path / "plan.json"
    result = run(model, "--ratio", "0.5", "--dry-run", "--plan-out", plan)
    assert result.exit_code == 0, result.output
    assert not model.with_name("mnist.pruned.onnx").exists()
    data = json.loads(plan.read_text())
    assert len(data["groups"]) == 4
    # edit the plan: keep the first group whole, then replay it
    data["groups"][0]["removed"] = {}
    data["groups"][0]["removed_units"] = 0
    plan.write_text(json.dumps(data))
    out = tmp_path / "replayed.onnx"
    result = run(model, "--plan-in", plan, "-o", out)
    assert result.exit_code == 0, result.output
    pruned = onnx.load(str(out))
    weights = {t.name: t for t in pruned.graph.initializer}
    assert list(weights["conv_layers.0.weight"].dims)[0] == 32
    assert list(weights["conv_layers.3.weight"].dims)[0] == 32


def test_broken_plan_is_refused(model, tmp_path):
    plan = tmp_path / "plan.json"
    run(model, "--dry-run", "--plan-out", plan)
    data = json.loads(plan.read_text())
    key = next(iter(data["groups"][1]["removed"]))
    data["groups"][1]["removed"][key] = data["groups"][1]["removed"][key][:-1]  # half a unit
    plan.write_text(json.dumps(data))
    result = run(model, "--plan-in", plan, "-o", tmp_path / "x.onnx")
    assert result.exit_code == 2 and "error:" in result.output
    assert not (tmp_path / "x.onnx").exists()


def test_analyze_text_and_json(model):
    result = run("analyze", model)
    assert result.exit_code == 0 and "prunable groups" in result.output
    result = run("analyze", model, "--json")
    data = json.loads(result.output)
    assert len(data["groups"]) == 4 and data["prunable_share"] > 0.9


@pytest.mark.parametrize("content", [b"", b"not an onnx file at all", None])
def test_bad_inputs_fail_in_one_line(tmp_path, content):
    path = tmp_path / "bad.onnx"
    if content is None:  # truncated real model
        path.write_bytes(MODEL.read_bytes()[:50000])
    else:
        path.write_bytes(content)
    result = run(path, "--ratio", "0.5")
    assert result.exit_code == 2
    assert result.output.startswith("error:") and "Traceback" not in result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.onnx"]


def test_missing_file_bad_ratio_unwritable_output(model, tmp_path):
    assert run(tmp_path / "nope.onnx").exit_code == 2
    result = run(model, "--ratio", "1.0")
    assert result.exit_code == 2 and "ratio" in result.output
    result = run(model, "-o", tmp_path / "missing_dir" / "x.onnx")
    assert result.exit_code == 2 and "does not exist" in result.output
    result = run(model, "-o", model)
    assert result.exit_code == 2 and "overwrite" in result.output


def test_external_data_round_trip_and_escape_refused(tmp_path):
    model = onnx.load(str(MODEL))
    ext = tmp_path / "ext"
    ext.mkdir()
    onnx.save_model(model, str(ext / "m.onnx"), save_as_external_data=True, location="m.onnx.data",
                    size_threshold=0)
    result = run(ext / "m.onnx", "--ratio", "0.5")
    assert result.exit_code == 0, result.output
    # a data location that escapes the model's folder is refused
    evil = onnx.load(str(ext / "m.onnx"), load_external_data=False)
    for t in evil.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../secret.data"
    (tmp_path / "secret.data").write_bytes(np.zeros(10, np.float32).tobytes())
    onnx.save_model(evil, str(ext / "evil.onnx"))
    result = run(ext / "evil.onnx")
    assert result.exit_code == 2 and "outside the model's folder" in result.output


def test_dynamic_dims_option(model, tmp_path):
    result = run(model, "--dim", "batch=3", "-o", tmp_path / "d.onnx")
    assert result.exit_code == 0, result.output
    result = run(model, "--dim", "batch=x", "-o", tmp_path / "e.onnx")
    assert result.exit_code == 2 and "--dim" in result.output
