import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _models():
    from tca_ggml import models
    return models


@pytest.fixture(scope="session")
def default_model() -> str:
    return str(_models().fetch("qwen2.5-coder-0.5b", quiet=True))


@pytest.fixture(scope="session")
def smol_model() -> str:
    return str(_models().fetch("smollm2-135m", quiet=True))


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
def smol(smol_model):
    from tca_ggml import Llama
    llm = Llama(smol_model, n_ctx=1024, n_threads=2, n_threads_batch=2, verbose=False)
    yield llm
    llm.close()
