"""The fuzz harness (scripts/fuzz/, docs/reliability.md "Fuzzing"): every regression file replays
without a crash, and a short coverage-guided run of each target finds nothing.

Each target runs in a subprocess (libFuzzer through atheris): a native abort, an unexpected
Python exception or a broken property ends it with a nonzero exit status and a crash report,
which fails the test with the report's tail. atheris is installed by scripts/setup.sh (the
optional extra `fuzz` of pyproject.toml).

No GGUF is committed: the micro models (the gguf target's seeds, the model of the others) are
written at run time into .cache/fuzz/micro/ with a sha256 check, and the GGUF regression inputs
are named mutations of micro.tca.gguf (scripts/fuzz/common.py: ensure_models, GGUF_MUTATIONS).
"""
import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FUZZ = REPO / "scripts" / "fuzz"
CORPUS = REPO / "tests" / "fuzz_corpus"
TARGETS = ("gguf", "tokenize", "state")

_spec = importlib.util.spec_from_file_location("tca_fuzz_common", FUZZ / "common.py")
common = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)


def _atheris():
    try:
        import atheris  # noqa: F401
    except ImportError:
        pytest.fail("atheris is not installed: scripts/setup.sh installs it (pip install '.[fuzz]')")


def run_target(target: str, args, timeout: float, cwd) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, str(FUZZ / f"fuzz_{target}.py"), *map(str, args)], capture_output=True,
                       text=True, timeout=timeout, cwd=str(cwd))
    out = r.stdout + r.stderr
    how = f"signal {-r.returncode}" if r.returncode < 0 else f"exit code {r.returncode}"
    assert r.returncode == 0, f"fuzz_{target} failed ({how})\n--- output (tail) ---\n{out[-6000:]}"
    return r


def regression_files():
    """The committed regression files (tests/fuzz_corpus/regressions/)."""
    return sorted((CORPUS / "regressions").iterdir())


def test_regression_corpus_is_small_and_covers_every_target():
    files = regression_files()
    assert all(f.name.split("-")[0] in TARGETS for f in files), [f.name for f in files]
    for t in TARGETS:
        inputs = common.regression_inputs(t)
        assert inputs, f"no regression input for the {t} target"
        assert all(f.name.startswith(t + "-") for f in inputs), [f.name for f in inputs]
    assert sorted(f.name for f in common.write_gguf_regressions()) == sorted(common.GGUF_MUTATIONS)
    committed = [f for f in CORPUS.rglob("*") if f.is_file()]
    ggufs = [str(f.relative_to(REPO)) for f in committed if f.suffix == ".gguf" or f.read_bytes()[:4] == b"GGUF"]
    assert not ggufs, f"model files in tests/fuzz_corpus (no GGUF in git: make them at run time): {ggufs}"
    total = sum(f.stat().st_size for f in committed)
    assert total < 100_000, f"tests/fuzz_corpus holds {total} bytes (keep it under 100 KB)"


@pytest.mark.parametrize("target", TARGETS)
def test_regression_files_replay_without_a_crash(target, tmp_path):
    """Each regression input of a target -- the files tests/fuzz_corpus/regressions/<target>-*
    and, for gguf, the mutations of micro.tca.gguf (common.GGUF_MUTATIONS, each checked byte for
    byte against the input that crashed) -- crashed (or was accepted silently) before the fix named
    in docs/reliability.md; libFuzzer runs each once ("Running: FILE")."""
    _atheris()
    files = common.regression_inputs(target)
    assert files, f"no regression input for the {target} target"
    r = run_target(target, [f"-artifact_prefix={tmp_path}/", *files], 300, tmp_path)
    out = r.stdout + r.stderr
    for f in files:
        assert f"Running: {f}" in out and f"Executed {f}" in out, f"{f.name} was not replayed\n{out[-3000:]}"


@pytest.mark.slow
@pytest.mark.parametrize("target", TARGETS)
def test_short_fuzz_run_finds_nothing(target, tmp_path):
    """CI's short run: 30 s of each target from its seed corpus (fixed seed), no finding. The long
    runs (>= 100,000 executions each) are in docs/reliability.md."""
    _atheris()
    work = tmp_path / "corpus"
    work.mkdir()
    r = run_target(target, ["-max_total_time=30", "-seed=17", "-timeout=30", "-print_final_stats=1",
                            f"-artifact_prefix={tmp_path}/", work, common.seed_dir(target)], 240, tmp_path)
    out = r.stdout + r.stderr
    m = re.search(r"Done (\d+) runs in (\d+) second", out)
    assert m and int(m.group(1)) >= 200, f"too few executions\n{out[-3000:]}"
    cov = [int(x) for x in re.findall(r"cov: (\d+)", out)]
    assert cov and max(cov) > 50, f"no coverage reported\n{out[-3000:]}"
    assert not list(tmp_path.glob("crash-*")) and not list(tmp_path.glob("timeout-*"))
