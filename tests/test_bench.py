"""`tca-ggml bench`: runs both arms side by side and reports ratios; rejects bad input.
(Speed itself is never asserted here: benchmarks are not timed tests.)"""
import argparse
import json

import pytest

from tca_ggml import bench


def _args(model, **kw):
    ap = argparse.ArgumentParser()
    bench.add_arguments(ap)
    argv = ["-m", model]
    for k, v in kw.items():
        argv += [k, str(v)]
    return ap.parse_args(argv)


@pytest.mark.slow
def test_bench_runs_both_arms(default_model, capsys):
    a = _args(default_model, **{"-p": "2000", "-n": "2", "--density": "0.25", "--tca-window": "256", "--batch": "128",
                                "--tca-block": "64", "--threads": "2", "-o": "json"})
    assert bench.main_cli(a) == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out["rows"]
    assert row["prompt"] == 2000 and row["tca_active"]
    assert "forced density 0.25 (uncalibrated)" in row["tca_label"]
    for k in ("dense_prefill_tps", "tca_prefill_tps", "dense_decode_tps", "tca_decode_tps"):
        assert row[k] > 0
    assert row["prefill_ratio"] == pytest.approx(row["tca_prefill_tps"] / row["dense_prefill_tps"])
    assert 0 < row["kv_ratio"] < 0.7  # budget 0.25 of aged blocks + w=256 + one ubatch of 128
    md = bench.to_markdown(out["rows"], default_model)
    assert "forced density 0.25 (uncalibrated)" in md and "| 2000 |" in md


def test_bench_bad_input(default_model, tmp_path, capsys):
    assert bench.main_cli(_args(str(tmp_path / "missing.gguf"))) == 2
    assert "not found" in capsys.readouterr().err
    assert bench.main_cli(_args(default_model, **{"-p": "40000", "--density": "0.2"})) == 2
    assert "exceeds the model's context" in capsys.readouterr().err
    assert bench.main_cli(_args(default_model, **{"-p": "1000"})) == 2  # uncalibrated, no --density
    assert "not calibrated" in capsys.readouterr().err
    assert bench.main_cli(_args(default_model, **{"--density": "1.5"})) == 2
    with pytest.raises(SystemExit):
        _args(default_model, **{"-p": "abc"})
