"""PruneOptions validation (one place for the API and the CLI) and the stage pipeline's contracts."""
from __future__ import annotations

import dataclasses

import pytest
from click.testing import CliRunner
from onnx import helper

import graphprune
from graphprune import cli, pipeline
from graphprune.errors import PassError
from graphprune.options import OptionError, PruneOptions, option_fields, parse_dim
from graphprune.passmanager import PassManager, Stage

from helpers import make_model, rand

BAD_OPTIONS = [
    ("ratio", 1.0), ("ratio", -0.1), ("ratio", float("nan")), ("ratio", "0.5"),
    ("target_macs", 0.0), ("target_macs", 1.5), ("target_params", -1.0),
    ("max_ratio", 5.0), ("max_ratio", 0.0),
    ("round_to", 0), ("round_to", -5), ("round_to", 2.5), ("min_channels", 0), ("min_channels", -5),
    ("calib_samples", 0), ("verify_samples", 0), ("verify_samples", -1), ("sensitivity_samples", 0),
    ("holdout", -1), ("seed", -1), ("sparse_threads", 0),
    ("sparsity", 0.0), ("sparsity", 1.0),
    ("importance", "bogus"), ("scope", "everything"), ("global_norm", "median"), ("proxy", "x"),
    ("compensate", "magic"), ("sparse_format", "coo"),
    ("input_dims", {"seq": 0}), ("input_dims", {"seq": 10 ** 9}), ("input_dims", {"": 3}),
]


@pytest.mark.parametrize("name,value", BAD_OPTIONS)
def test_bad_option_values_raise_option_error_naming_the_option(name, value):
    with pytest.raises(OptionError, match=name.split("[")[0]):
        PruneOptions.from_kwargs(**{name: value})


def test_option_combinations_are_checked_once():
    with pytest.raises(OptionError, match="not both"):
        PruneOptions.from_kwargs(target_macs=0.5, target_params=0.5)
    with pytest.raises(OptionError, match="calibration data"):
        PruneOptions.from_kwargs(bn_recalibrate=True)
    with pytest.raises(OptionError, match="budget"):
        PruneOptions.from_kwargs(scope="sensitivity")
    with pytest.raises(OptionError, match="unknown option"):
        PruneOptions.from_kwargs(ratoi=0.5)


def test_derived_settings():
    assert PruneOptions().effective_ratio == 0.5
    assert PruneOptions(sparsity=0.5).effective_ratio == 0.0
    assert PruneOptions(importance="obspa").compensation == "obs"
    assert PruneOptions(compensate="lsq").compensation == "obs"
    assert PruneOptions(importance="l1").compensation == "none"
    assert PruneOptions(target_params=0.4).target == ("params", 0.4)


@pytest.mark.parametrize("item", ["N=²", "N=", "=4", "N=0", "N=-3", "N", "N=4.5"])
def test_parse_dim_refuses_non_positive_ascii_integers(item):
    with pytest.raises(OptionError):
        parse_dim(item)


def test_every_exposed_option_is_a_cli_flag():
    """The CLI is generated from PruneOptions: every field not marked API-only has a flag of its own name."""
    params = {p.name for p in cli.prune.params}
    for f in option_fields():
        if f.metadata.get("cli") == "":
            continue
        assert f.name in params, f"PruneOptions.{f.name} has no CLI option"


@pytest.mark.parametrize("args,needle", [
    (["--max-ratio", "5"], "max_ratio"), (["--round-to", "0"], "round_to"), (["--min-channels", "-5"], "min_channels"),
    (["--verify-samples", "0"], "verify_samples"), (["--importance", "bogus"], "bogus"), (["--dim", "N=²"], "--dim"),
])
def test_cli_bad_values_one_error_line_exit_2(tmp_path, args, needle):
    model = tmp_path / "m.onnx"
    model.write_bytes(_tiny().SerializeToString())
    result = CliRunner().invoke(cli.main, [str(model), *args])
    assert result.exit_code == 2, result.output
    if result.output.startswith("error:"):
        assert len(result.output.strip().splitlines()) == 1
    assert needle in result.output


def test_names_with_markup_are_printed_as_data(tmp_path):
    folder = tmp_path / "[red]x[dim]"
    folder.mkdir()
    model = folder / "m[bold].onnx"
    model.write_bytes(_tiny().SerializeToString())
    result = CliRunner().invoke(cli.main, [str(model), "--ratio", "0.5", "-o", str(folder / "out[bold].onnx")])
    assert result.exit_code == 0, result.output
    assert "out[bold].onnx" in result.output
    assert (folder / "out[bold].onnx").exists()


def test_plan_out_may_not_be_the_model_or_the_output(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(_tiny().SerializeToString())
    before = model.read_bytes()
    result = CliRunner().invoke(cli.main, [str(model), "--plan-out", str(model)])
    assert result.exit_code == 2 and "would overwrite the input model" in result.output
    assert model.read_bytes() == before
    out = tmp_path / "o.onnx"
    result = CliRunner().invoke(cli.main, [str(model), "-o", str(out), "--plan-out", str(out)])
    assert result.exit_code == 2 and "same file" in result.output
    assert not out.exists()


def test_stage_log_lists_every_stage_in_order():
    _, report = graphprune.prune(_tiny(), ratio=0.5)
    expected = [s.name for s in pipeline.stages()]
    assert len(report.stage_log) == len(expected)
    for line, name in zip(report.stage_log, expected, strict=True):
        assert line.startswith(name + " "), (line, name)
    ran = [line for line in report.stage_log if "skipped" not in line]
    assert {line.split()[0] for line in ran} >= {"load", "canonicalize", "analyze", "score", "allocate", "rewrite",
                                                  "check", "verify"}
    assert any(line.startswith("verify") and "max abs diff" in line for line in report.stage_log)


def test_stage_contract_names_the_missing_input():
    @dataclasses.dataclass
    class Ctx:
        a: object = None
        b: object = None

    stages = [Stage("first", lambda c: None, provides=()),
              Stage("second", lambda c: None, needs=("a",))]
    with pytest.raises(PassError, match="'second' needs a"):
        PassManager().run_stages(stages, Ctx())
    with pytest.raises(PassError, match="did not provide b"):
        PassManager().run_stages([Stage("third", lambda c: None, provides=("b",))], Ctx())


def test_stage_failure_names_the_stage_and_chains_the_cause():
    def boom(ctx):
        raise KeyError("x")
    pm = PassManager()
    pm.run_stages([Stage("ok", lambda c: "fine")], object())
    with pytest.raises(PassError, match=r"stage 'boom' failed after \(ok\): KeyError") as info:
        pm.run_stages([Stage("boom", boom)], object())
    assert isinstance(info.value.__cause__, KeyError)


def test_options_object_and_keywords_agree():
    model = _tiny()
    a, ra = graphprune.prune(model, PruneOptions(ratio=0.25, importance="l2"))
    b, rb = graphprune.prune(model, ratio=0.25, importance="l2")
    assert ra.kept_widths == rb.kept_widths
    assert a.SerializeToString() == b.SerializeToString()


def _tiny():
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["h"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])]
    return make_model(nodes, [("x", [1, 3, 8, 8])], [("y", [1, 4, 8, 8])],
                      {"w1": rand(8, 3, 3, 3, seed=1), "b1": rand(8, seed=2), "w2": rand(4, 8, 3, 3, seed=3)})


def test_sparse_plan_out_may_not_be_the_model(tmp_path):
    model = tmp_path / "m.onnx"
    model.write_bytes(_tiny().SerializeToString())
    result = CliRunner().invoke(cli.main, [str(model), "--sparsity", "0.5", "--sparse-plan-out", str(model)])
    assert result.exit_code == 2 and "--sparse-plan-out" in result.output and "input model" in result.output


def test_checker_failure_of_the_pruned_model_alone_fails_even_without_verification(monkeypatch):
    """Only a complaint the dense input model draws as well is a note; one the pruned model alone draws fails,
    whether or not verification (which used to be the only reason a dense copy was kept) runs."""
    import onnx

    from graphprune import runtime

    calls = []

    def check(model):
        calls.append(model)
        if len(calls) == 1:  # the pruned model
            raise onnx.checker.ValidationError("broken by the rewrite")
        return True
    monkeypatch.setattr(runtime, "check_model", check)
    with pytest.raises(PassError, match="stage 'check' failed .*broken by the rewrite"):
        graphprune.prune(_tiny(), ratio=0.5, verify=False, importance="l1")
    assert len(calls) == 2  # the dense model was checked too, and passed
