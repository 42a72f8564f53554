"""Shared fixtures of the test suite, and its fast/slow split.

Markers (registered in pyproject.toml): ``slow`` tests load a model for long prompts, run an
end-to-end tool, or sweep many cases; everything else is marked ``fast`` here, so that
``pytest -m "not slow"`` (or ``-m fast``) is the developer's quick set and a plain ``pytest``
(scripts/test.sh, CI) runs everything. Helpers shared by several test files live in
tests/_helpers.py (a module, imported as ``_helpers``).
"""
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Modules whose every test counts as slow, for files that do not mark their tests themselves
# (test_retention.py: 50-60 s a test; its parameter-error tests are fast but go with the file).
SLOW_MODULES = {"test_eval.py", "test_calibration.py", "test_retention.py"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.path.name in SLOW_MODULES and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.fast)


def _models():
    from tca_ggml import models
    return models


# ---------------------------------------------------------------- models
@pytest.fixture(scope="session")
def default_model() -> str:
    return str(_models().fetch("qwen2.5-coder-0.5b", quiet=True))


@pytest.fixture(scope="session")
def smol_model() -> str:
    return str(_models().fetch("smollm2-135m", quiet=True))


@pytest.fixture(scope="session")
def smol(smol_model):
    from tca_ggml import Llama
    llm = Llama(smol_model, n_ctx=1024, n_threads=2, n_threads_batch=2, verbose=False)
    yield llm
    llm.close()


# ---------------------------------------------------------------- native libraries
@pytest.fixture(scope="session")
def native_lib() -> Path:
    from tca_ggml import _native
    _native.lib()
    return _native._lib_path


@pytest.fixture(scope="session")
def llama_simple(native_lib) -> Path:
    env = os.environ.get("TCA_GGML_SIMPLE")
    p = Path(env) if env else native_lib.parent.parent / "bin" / "tca-llama-simple"
    if not p.exists():
        pytest.fail(f"upstream reference program not found at {p} (it is installed with the package)")
    return p


@pytest.fixture(scope="session")
def ops():
    """(ffi, lib) of the test library (libtca_ggml_test.so: native/tests/tca_test_ops.h)."""
    import _helpers
    path = _helpers.ops_library_path()
    if not path.exists():
        pytest.fail(f"test library not found at {path}: it is built and installed beside libtca_ggml.so "
                    f"unless -DTCA_GGML_BUILD_TESTS=OFF (scripts/setup.sh builds it); or set TCA_GGML_TEST_LIB")
    return _helpers.open_ops_library()


@pytest.fixture(scope="session")
def cuda(ops):
    """The test library, where the build and machine have the CUDA backend (_helpers.CUDA:
    CUDA0, or TCA_CUDA_BACKEND); skips otherwise (CI has no GPU)."""
    import _helpers
    if not _helpers.has_backend(ops, _helpers.CUDA):
        pytest.skip(f"no CUDA backend in this build (CI has no GPU): {_helpers.CUDA} not found")
    return ops
