"""The README's main job (python -m tca_ggml.demo): dense and TCA side by side, the model calibrated
once and cached next to it. Run here on SmolLM2 with a short document and a small window, so that
TCA evicts (the default model at 8K is the README's command, a few minutes on 2 cores)."""
import shutil
import subprocess
import sys

import pytest


@pytest.mark.slow
def test_demo_runs_both_arms_and_calibrates_once(smol_model, tmp_path):
    model = tmp_path / "smol.gguf"
    shutil.copy(smol_model, model)
    args = [sys.executable, "-m", "tca_ggml.demo", "--model", str(model), "--tokens", "1500", "--depth", "0.3",
            "--calib-ctx", "2048", "--tca-window", "256", "--tca-block", "64", "--threads", "2"]
    r1 = subprocess.run(args, capture_output=True, text=True, timeout=900)
    assert r1.returncode in (0, 2), r1.stderr[-3000:]          # 2: an arm answered wrongly (SmolLM2 is small)
    cached = tmp_path / "smol.tca2k.w256b64.gguf"
    assert cached.exists() and "calibrating" in r1.stderr
    out = r1.stdout
    for row in ("answer", "correct", "time to first token", "decode", "KV memory", "TCA vs dense"):
        assert row in out, out
    assert "dense (upstream)" in out and "hold tier" in out and "TTFT" in out
    assert "TCA was not active" not in out
    # the second run uses the cached calibration, and greedy answers repeat
    r2 = subprocess.run(args + ["--arms", "tca"], capture_output=True, text=True, timeout=900)
    assert "calibrating" not in r2.stderr
    ans = lambda o: [ln for ln in o.splitlines() if ln.startswith("answer")][0].split("|")[-1].strip()
    assert ans(r2.stdout) == ans(out)
