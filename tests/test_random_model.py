"""Random-weight GGUFs of real model shapes (tca_ggml.random_model): the tiny shape loads and
runs in llama.cpp with finite logits; the metadata reads back as in the table; the tensor plans
of the real shapes are what llama.cpp's loader asks for (checked against dims written out here
from llama.cpp's create_tensor calls, and by loading sparse header-only files of the real
shapes); bad input is refused."""
import hashlib

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from tca_ggml import gguf_meta as gm  # noqa: E402
from tca_ggml import random_model as rm  # noqa: E402

PROMPT = b"The quick brown fox jumps over the lazy dog. 0123456789 \xc3\xa9\n  end"


def _expect_meta(s, n_layer=None, n_ctx=None):
    a = s.arch
    return {
        "general.architecture": a,
        f"{a}.block_count": s.n_layer if n_layer is None else n_layer,
        f"{a}.context_length": s.n_ctx_train if n_ctx is None else n_ctx,
        f"{a}.embedding_length": s.n_embd,
        f"{a}.feed_forward_length": s.n_ff,
        f"{a}.attention.head_count": s.n_head,
        f"{a}.attention.head_count_kv": s.n_head_kv,
        f"{a}.rope.dimension_count": s.n_embd // s.n_head,
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.bos_token_id": s.bos_id,
        "tokenizer.ggml.eos_token_id": s.eos_id,
    }


def _check_meta(path, s, wtype, **kw):
    md = gm.read_kv(path)
    for k, v in _expect_meta(s, **kw).items():
        assert md[k] == v, (k, md[k], v)
    a = s.arch
    assert md[f"{a}.rope.freq_base"] == pytest.approx(s.rope_freq_base)
    assert md[f"{a}.attention.layer_norm_rms_epsilon"] == pytest.approx(s.rms_eps)
    assert md["general.file_type"] == {"q8_0": 7, "f16": 1, "f32": 0}[wtype]
    assert len(md["tokenizer.ggml.tokens"]) == s.n_vocab == len(md["tokenizer.ggml.token_type"])
    assert len(set(md["tokenizer.ggml.tokens"])) == s.n_vocab
    return md


def _check_tensors(path, plan):
    r = gguf.GGUFReader(str(path))
    got = [(t.name, tuple(int(x) for x in t.shape), int(t.tensor_type), int(t.n_bytes)) for t in r.tensors]
    assert got == [(t.name, t.ne, t.ggml_type, t.nbytes) for t in plan]
    last = r.tensors[-1]
    assert r.data.size >= last.data_offset + last.n_bytes  # the data is all there (sparse or not)
    return r


def test_table_values():
    """The shapes are the published config.json values."""
    s = rm.SHAPES["llama-3.1-8b"]
    assert (s.arch, s.n_layer, s.n_embd, s.n_head, s.n_head_kv, s.n_ff, s.n_vocab, s.n_ctx_train) == \
        ("llama", 32, 4096, 32, 8, 14336, 128256, 131072)
    assert (s.rope_freq_base, s.rms_eps, s.tied_embeddings, s.qkv_bias) == (500000.0, 1e-5, False, False)
    s = rm.SHAPES["llama-3.2-1b"]
    assert (s.arch, s.n_layer, s.n_embd, s.n_head, s.n_head_kv, s.n_ff, s.n_vocab, s.n_ctx_train) == \
        ("llama", 16, 2048, 32, 8, 8192, 128256, 131072)
    assert (s.rope_freq_base, s.rms_eps, s.tied_embeddings, s.qkv_bias) == (500000.0, 1e-5, True, False)
    s = rm.SHAPES["qwen2.5-0.5b"]
    assert (s.arch, s.n_layer, s.n_embd, s.n_head, s.n_head_kv, s.n_ff, s.n_vocab, s.n_ctx_train) == \
        ("qwen2", 24, 896, 14, 2, 4864, 151936, 32768)
    assert (s.rope_freq_base, s.rms_eps, s.tied_embeddings, s.qkv_bias) == (1000000.0, 1e-6, True, True)
    # q8_0 sizes close to the real Q8_0 files (8B: 8.54 GB; 1B: 1.32 GB; 0.5B: 0.53 GB)
    assert 8.4e9 < rm.file_size_estimate("llama-3.1-8b") < 8.6e9
    assert 1.25e9 < rm.file_size_estimate("llama-3.2-1b") < 1.35e9


@pytest.mark.parametrize("wtype", ["q8_0", "f16"])
def test_tiny_loads_and_runs(native_lib, tmp_path, wtype):
    from tca_ggml import Llama
    s = rm.SHAPES["tiny"]
    p = tmp_path / f"tiny-{wtype}.gguf"
    info = rm.write_random_gguf(p, "tiny", wtype=wtype, seed=3)
    assert info["bytes"] == p.stat().st_size and info["n_tensors"] == len(rm.tensor_plan("tiny", wtype))
    assert not (tmp_path / f"tiny-{wtype}.gguf.tmp").exists()
    _check_meta(p, s, wtype)
    _check_tensors(p, rm.tensor_plan("tiny", wtype))
    with Llama(str(p), n_ctx=512, n_threads=2, n_threads_batch=2, verbose=False) as llm:
        assert (llm.n_vocab(), llm.n_embd(), llm.n_ctx()) == (s.n_vocab, s.n_embd, 512)
        assert (llm.token_bos(), llm.token_eos()) == (s.bos_id, s.eos_id)
        toks = llm.tokenize(PROMPT, add_bos=True)
        assert toks[0] == s.bos_id and len(toks) == len(PROMPT) + 1  # byte-level: 1 token per byte
        assert llm.detokenize(toks[1:]) == PROMPT
        lg = llm.eval_logits(toks)
        assert lg.shape == (s.n_vocab,) and np.isfinite(lg).all()
        assert 0.3 < float(lg.std()) < 3.0  # O(1) logits: not collapsed, not blown up
        out = llm(PROMPT.decode(), max_tokens=8, temperature=0)
        assert out["usage"]["completion_tokens"] >= 1


def test_seed_is_deterministic(tmp_path):
    digest = lambda p: hashlib.sha256(p.read_bytes()).hexdigest()
    a, b, c = tmp_path / "a.gguf", tmp_path / "b.gguf", tmp_path / "c.gguf"
    rm.write_random_gguf(a, "tiny", seed=7)
    rm.write_random_gguf(b, "tiny", seed=7)
    rm.write_random_gguf(c, "tiny", seed=8)
    assert digest(a) == digest(b) != digest(c)


def test_overrides_and_budgets(tmp_path):
    from tca_ggml import gguf_meta
    p = tmp_path / "t.gguf"
    rm.write_random_gguf(p, "tiny", wtype="f32", n_layer=3, n_ctx_train=4096, random_budgets=True)
    _check_meta(p, rm.SHAPES["tiny"], "f32", n_layer=3, n_ctx=4096)
    _check_tensors(p, rm.tensor_plan("tiny", "f32", n_layer=3))
    b = gguf_meta.read_budgets(str(p))
    assert b is not None and b.n_layer == 3 and list(b.n_head_kv) == [2, 2, 2]


def _llama_cpp_expected(s):
    """{name: dims} as llama.cpp's create_tensor asks for them (src/models/llama.cpp and
    qwen2.cpp), written out independently of random_model."""
    E, V, F, hd = s.n_embd, s.n_vocab, s.n_ff, s.n_embd // s.n_head
    q, kv = s.n_head * hd, s.n_head_kv * hd
    exp = {"token_embd.weight": (E, V), "output_norm.weight": (E,)}
    if not s.tied_embeddings:
        exp["output.weight"] = (E, V)
    if s.name.startswith("llama-3"):
        exp["rope_freqs.weight"] = (hd // 2,)
    for i in range(s.n_layer):
        p = f"blk.{i}."
        exp.update({p + "attn_norm.weight": (E,), p + "attn_q.weight": (E, q), p + "attn_k.weight": (E, kv),
                    p + "attn_v.weight": (E, kv), p + "attn_output.weight": (q, E), p + "ffn_norm.weight": (E,),
                    p + "ffn_gate.weight": (E, F), p + "ffn_up.weight": (E, F), p + "ffn_down.weight": (F, E)})
        if s.arch == "qwen2":
            exp.update({p + "attn_q.bias": (q,), p + "attn_k.bias": (kv,), p + "attn_v.bias": (kv,)})
    return exp


@pytest.mark.parametrize("name", ["llama-3.1-8b", "llama-3.2-1b", "qwen2.5-0.5b", "tiny"])
@pytest.mark.parametrize("wtype", ["q8_0", "f16", "f32"])
def test_plan_matches_llama_cpp(name, wtype):
    s = rm.SHAPES[name]
    plan = rm.tensor_plan(name, wtype)
    exp = _llama_cpp_expected(s)
    assert {t.name: t.ne for t in plan} == exp and len(plan) == len(exp)
    for t in plan:
        n = int(np.prod(t.ne))
        if len(t.ne) == 1:
            assert (t.type_name, t.nbytes) == ("f32", 4 * n), t.name
        else:
            assert t.type_name == wtype, t.name
            assert t.nbytes == {"q8_0": n // 32 * 34, "f16": 2 * n, "f32": 4 * n}[wtype], t.name


@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen2.5-0.5b"])
def test_real_shape_header_loads_in_llama_cpp(native_lib, tmp_path, name):
    """The full-size header (real tensor infos, vocabulary) with the weight data left as a hole
    (sparse file: a few MB on disk, zeros when read): llama.cpp's loader checks every tensor's
    name, type and dims against the architecture and the file's size against the offsets."""
    from tca_ggml import Llama
    s = rm.SHAPES[name]
    p = tmp_path / f"{name}.gguf"
    plan = rm.tensor_plan(name, "q8_0")
    rm.write_random_gguf(p, name, "q8_0", data=False)
    _check_meta(p, s, "q8_0")
    lay = gm._scan(p)
    assert [(t.name, t.shape, t.ggml_type, t.nbytes) for t in lay.tensors] == \
        [(t.name, t.ne, t.ggml_type, t.nbytes) for t in plan]
    last = lay.tensors[-1]
    assert lay.size == lay.data_offset + last.offset + last.nbytes < 16 * 2**20 + sum(t.nbytes for t in plan)
    with Llama(str(p), n_ctx=512, n_threads=2, verbose=False) as llm:
        assert (llm.n_vocab(), llm.n_embd()) == (s.n_vocab, s.n_embd)
        assert (llm.token_bos(), llm.token_eos()) == (s.bos_id, s.eos_id)
        toks = llm.tokenize(b"hello world", add_bos=True)
        assert toks == ([s.bos_id] if s.add_bos else []) + list(b"hello world")
        # (no decode here: it would read the whole 0.5-1.3 GB of zero pages)


def test_unknown_shape_and_bad_input(tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown model shape 'nope'.*llama-3.1-8b"):
        rm.write_random_gguf(tmp_path / "x.gguf", "nope")
    with pytest.raises(ValueError, match="unknown model shape"):
        rm.tensor_plan("llama-3.1-70b")
    with pytest.raises(ValueError, match="unknown weight type"):
        rm.write_random_gguf(tmp_path / "x.gguf", "tiny", wtype="q4_0")
    with pytest.raises(ValueError, match="n_layer"):
        rm.tensor_plan("tiny", n_layer=0)
    assert not list(tmp_path.iterdir())  # nothing left behind

    assert rm.main(["--shape", "nope", "-o", str(tmp_path / "x.gguf")]) == 2
    assert "unknown shape 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rm.main(["--shape", "tiny", "--wtype", "q4_0", "-o", str(tmp_path / "x.gguf")])
    capsys.readouterr()
    out = tmp_path / "cli.gguf"
    assert rm.main(["--shape", "tiny", "--wtype", "f16", "-o", str(out), "--seed", "5"]) == 0
    assert "tiny f16" in capsys.readouterr().out and out.exists()
    assert rm.main(["--shape", "tiny", "-o", str(out)]) == 2  # exists, no --force
    assert "exists" in capsys.readouterr().err
    assert rm.main(["--shape", "tiny", "-o", str(out), "--force"]) == 0
    assert rm.main(["--list"]) == 0
    assert "llama-3.2-1b" in capsys.readouterr().out
