"""Budget allocation: global scope and MACs/params targets, from the API and the CLI."""

import numpy as np
import pytest

import graphprune

from helpers import MNIST


def test_global_scope_prunes_layers_unevenly_and_meets_params_target():
    pruned, report = graphprune.prune(str(MNIST), importance="l2", scope="global", target_params=0.4,
                                      verify=True, verify_samples=1)
    assert abs(report.params_after / report.params_before - 0.4) <= 0.01 * 0.4
    kept = [after / before for _, before, after in report.kept_widths]
    assert max(kept) - min(kept) > 0.05


@pytest.mark.slow
def test_cli_target_macs_obspa_calib(tmp_path):
    from click.testing import CliRunner

    from graphprune.cli import main
    np.savez(tmp_path / "feeds.npz", input=np.random.default_rng(1).standard_normal((40, 1, 28, 28)).astype(np.float32))
    out = tmp_path / "p.onnx"
    result = CliRunner().invoke(main, [str(MNIST), "--target-macs", "0.5", "--importance", "obspa", "--calib",
                                       str(tmp_path / "feeds.npz"), "-o", str(out)])
    assert result.exit_code == 0, result.output
    assert "held-out calibration samples" in result.output and "compensated" in result.output
