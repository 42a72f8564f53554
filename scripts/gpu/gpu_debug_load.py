# device debugging aid: load a random-weight model with tca_ggml.Llama in the given mode
import sys
import numpy as np
from tca_ggml import Llama
from tca_ggml.random_model import write_random_gguf
path = "/tmp/dbg.gguf"
import os
if not os.path.exists(path):
    write_random_gguf(path, "llama-3.2-1b", "q8_0", seed=1, n_layer=4)
ngl = int(sys.argv[1])
kw = dict(tca=True, tca_density=0.25, tca_window=512, tca_block=64) if len(sys.argv) > 2 and sys.argv[2] == "tca" else {}
print("loading", ngl, kw, flush=True)
with Llama(path, n_ctx=4096, n_batch=512, n_ubatch=512, n_gpu_layers=ngl, n_threads=4, verbose=True, **kw) as llm:
    toks = [1] + np.random.default_rng(0).integers(300, 5000, size=2999).tolist()
    lg = llm.eval_logits(toks)
    print("ok", ngl, kw, float(lg.std()), llm.tca_stats()["n_compactions"], llm.tca_stats()["bytes_device"], flush=True)
