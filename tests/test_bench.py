"""`tca-ggml bench`: runs both arms side by side and reports ratios; rejects bad input.
(Speed itself is never asserted here: benchmarks are not timed tests.)"""
import argparse
import json

import pytest

from tca_ggml import bench


def _args(model, *extra, **kw):
    ap = argparse.ArgumentParser()
    bench.add_arguments(ap)
    argv = ["-m", model]
    for k, v in kw.items():
        argv += [k, str(v)]
    return ap.parse_args(argv + list(extra))


@pytest.mark.slow
def test_bench_runs_both_arms(default_model, capsys):
    a = _args(default_model, **{"-p": "2000", "-n": "2", "--density": "0.25", "--tca-window": "256", "--batch": "128",
                                "--tca-block": "64", "--threads": "2", "-o": "json", "--also-prefill": "sparse"})
    assert bench.main_cli(a) == 0
    out = json.loads(capsys.readouterr().out)
    (row,) = out["rows"]
    assert row["prompt"] == 2000 and row["tca_active"]
    assert "forced density 0.25 (uncalibrated)" in row["tca_label"]
    for k in ("dense_prefill_tps", "tca_prefill_tps", "dense_decode_tps", "tca_decode_tps"):
        assert row[k] > 0
    assert row["prefill_ratio"] == pytest.approx(row["tca_prefill_tps"] / row["dense_prefill_tps"])
    # on the CPU every decode step attends every held row (tca_hold_decode's default there, -1):
    # 'after' is every step after the first
    assert row["tca_hold_decode"] == -1 and row["after_ratio"] > 0.0
    # resident after the prompt: 0.25 of the aged blocks (+ the final selection's 4 whole blocks of 64)
    # + w=256 + the generated rows: (0.25 * 1744 + 256 + 256 + 2) / 2000 = 0.48 (+ positions, 4 B a row)
    assert 0.3 < row["resident_ratio"] < 0.55
    # the fast tier is allocated for its peak: that + one ubatch, the final selection's queries and slack
    assert row["resident_ratio"] < row["kv_ratio"] < 1.0
    assert row["tca_hold_bytes"] >= row["dense_kv_bytes"]  # retention "hold" (the default): every row
    # the third arm: the same budgets with sparse prefill (the TCA arm's is the default, early);
    # what stays after the prompt is budgeted alike
    assert row["tca_prefill"] == "early" and row["prefill2"] == "sparse"
    assert row["prefill2_prefill_tps"] > 0 and row["prefill2_decode_tps"] > 0
    assert row["prefill2_resident_bytes"] == pytest.approx(row["tca_resident_bytes"], rel=0.01)
    md = bench.to_markdown(out["rows"], default_model)
    assert "forced density 0.25 (uncalibrated)" in md and "| 2000 |" in md and "prefill sparse" in md


@pytest.mark.slow
def test_bench_also_opt_arm(default_model, capsys):
    """--also-opt: a third arm with the TCA arm's options plus these -- here every decode step
    attending a q8_0 hold tier (hold_decode=-1, hold_type=8): the hold tier is about half the f16
    one, the kept set after the prompt is budgeted alike, and 'after' covers every step."""
    a = _args(default_model, "--also-opt", "hold_decode=-1", "--also-opt", "hold_type=8",
              **{"-p": "2000", "-n": "3", "--density": "0.25", "--tca-window": "256", "--batch": "128",
                 "--tca-block": "64", "--threads": "2", "-o": "json"})
    assert bench.main_cli(a) == 0
    (row,) = json.loads(capsys.readouterr().out)["rows"]
    assert row["prefill2_opts"] == "hold_decode=-1 hold_type=8" and row["prefill2_hold_decode"] == -1
    # q8_0: 34 bytes a 32-value block vs f16's 64 (+ the same constant positions)
    assert 0.45 < row["prefill2_hold_bytes"] / row["tca_hold_bytes"] < 0.6
    assert row["prefill2_resident_bytes"] == pytest.approx(row["tca_resident_bytes"], rel=0.01)
    assert row["prefill2_after_tps"] > 0 and row["prefill2_after_ratio"] > 0  # every step counts: none held back
    assert "hold_decode=-1 hold_type=8" in bench.to_markdown([row], default_model)


def test_bench_bad_input(default_model, tmp_path, capsys):
    assert bench.main_cli(_args(str(tmp_path / "missing.gguf"))) == 2
    assert "not found" in capsys.readouterr().err
    assert bench.main_cli(_args(default_model, **{"-p": "40000", "--density": "0.2"})) == 2
    assert "exceeds the model's context" in capsys.readouterr().err
    assert bench.main_cli(_args(default_model, **{"-p": "1000"})) == 2  # uncalibrated, no --density
    assert "not calibrated" in capsys.readouterr().err
    assert bench.main_cli(_args(default_model, **{"--density": "1.5"})) == 2
    assert bench.main_cli(_args(default_model, "--also-opt", "hold_decode", **{"--density": "0.2"})) == 2
    assert "KEY=VALUE" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _args(default_model, **{"-p": "abc"})


@pytest.mark.slow
def test_bench_parallel_mode(smol_model, capsys):
    """--parallel: aggregate decode t/s of N sequences decoded together, both arms, one row per N;
    KV of all sequences (TCA: each sequence's budgeted fast tier)."""
    a = _args(smol_model, **{"-p": "1500", "-n": "3", "--density": "0.2", "--tca-window": "256", "--tca-block": "64",
                             "--batch": "256", "--threads": "2", "-o": "json", "--parallel": "1,3"})
    assert bench.main_cli(a) == 0
    rows = json.loads(capsys.readouterr().out)["rows"]
    assert [r["n_seq"] for r in rows] == [1, 3]
    for r in rows:
        assert r["prompt"] == 1500 and r["dense_agg_tps"] > 0 and r["tca_agg_tps"] > 0
        assert r["ratio"] == pytest.approx(r["tca_agg_tps"] / r["dense_agg_tps"])
        # three sequences, each ~1500 + the decoded rows: TCA keeps a fraction of each
        assert 0 < r["tca_resident_bytes"] < 0.7 * r["dense_kv_bytes"]
    md = bench.parallel_markdown(rows, smol_model)
    assert "| 1500 | 3 |" in md and "3 sequences" in md
    assert bench.main_cli(_args(smol_model, **{"--density": "0.2", "--parallel": "2", "-d": "100"})) == 2
    assert "--parallel" in capsys.readouterr().err
