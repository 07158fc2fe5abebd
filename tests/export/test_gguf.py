"""`nemotron3 export --format gguf`: the file read back with gguf's own reader holds our tensors under llama.cpp's
names and layouts, our hyperparameters under its keys, and our tokenizer; bad input fails with one line.

Comparisons: f32 is bit for bit (the transforms are copies, reshapes, a row permutation and -exp, computed by the
same torch function on the same inputs: exact by construction); bf16 bit for bit against torch's own rounding (both
round to nearest even); q8_0 within its error bound computed per block from our weights; f16 (q8_0's fallback for
rows that are not whole blocks) bit for bit against numpy's rounding. The slow test runs llama.cpp itself
(llama-cpp-python, the `llama-cpp` extra) on the export and compares its greedy tokens with our Engine's.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_HF_CONFIGS, randomize_

gguf = pytest.importorskip("gguf")

import nemotron3  # noqa: E402
from nemotron3.cli import main  # noqa: E402
from nemotron3.config import ModelConfig  # noqa: E402
from nemotron3.export import ExportConfig, export  # noqa: E402
from nemotron3.options import ConfigError  # noqa: E402
from nemotron3.tokenizer import SPECIAL_TOKENS, Tokenizer  # noqa: E402

TEXTS = ["the cat sat on the mat, then the dog ate the hat", "<|im_start|>user\nwhat is 12 + 30?<|im_end|>"] * 20


def _checkpoint(folder, hf: dict, seed: int = 0):
    config = ModelConfig.from_hf({**hf, "vocab_size": 320})  # room for the tokenizer's 300
    torch.manual_seed(seed)
    model = nemotron3.HybridLM(config)
    randomize_(model, seed)
    nemotron3.save_pretrained(model, folder)
    Tokenizer.train(TEXTS, 300).save(folder)
    return folder


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """LatentMoE (latent 24: rows of 24 are not whole q8_0 blocks), two Mamba groups, GQA, and an MTP block."""
    hf = {**TINY_HF_CONFIGS["latent-2groups"], "vocab_size": 320, "num_nextn_predict_layers": 1}
    return _checkpoint(tmp_path_factory.mktemp("src") / "ckpt", hf)


@pytest.fixture(scope="module")
def files(source, tmp_path_factory):
    root = tmp_path_factory.mktemp("gguf")
    return {t: export(ExportConfig(model=source, outtype=t, out=root / f"{t}.gguf")) for t in ("f32", "bf16", "q8_0")}


@pytest.fixture(scope="module")
def ours(source):
    model = nemotron3.load_pretrained(source, dtype=torch.float32)
    return model.config, {k: v.float() for k, v in model.state_dict().items()}


def expected(config: ModelConfig, sd: dict) -> dict[str, torch.Tensor]:
    """What llama.cpp's converter makes of each tensor, written out here from its source (docs/export.md)."""
    def heads(w, n):  # LlamaModel.permute, written as an index permutation: row h*d + 2j+s <- h*d + s*d/2 + j
        d = w.shape[0] // n
        order = torch.tensor([h * d + s * (d // 2) + j for h in range(n) for j in range(d // 2) for s in range(2)])
        return w[order]

    out = {"token_embd.weight": sd["backbone.embeddings.weight"], "output_norm.weight": sd["backbone.norm_f.weight"],
           "output.weight": sd["lm_head.weight"]}
    for i, kind in enumerate(config.pattern):
        m, b = f"backbone.layers.{i}.mixer.", f"blk.{i}."
        out[b + "attn_norm.weight"] = sd[f"backbone.layers.{i}.norm.weight"]
        if kind == "M":
            out |= {b + "ssm_in.weight": sd[m + "in_proj.weight"], b + "ssm_out.weight": sd[m + "out_proj.weight"],
                    b + "ssm_conv1d.weight": sd[m + "conv1d.weight"][:, 0, :],
                    b + "ssm_conv1d.bias": sd[m + "conv1d.bias"], b + "ssm_dt.bias": sd[m + "dt_bias"],
                    b + "ssm_a": -torch.exp(sd[m + "A_log"])[:, None], b + "ssm_d": sd[m + "D"][:, None],
                    b + "ssm_norm.weight": sd[m + "norm.weight"].view(config.n_groups, -1)}
        elif kind == "*":
            out |= {b + "attn_q.weight": heads(sd[m + "q_proj.weight"], config.num_attention_heads),
                    b + "attn_k.weight": heads(sd[m + "k_proj.weight"], config.num_key_value_heads),
                    b + "attn_v.weight": sd[m + "v_proj.weight"], b + "attn_output.weight": sd[m + "o_proj.weight"]}
        elif kind == "E":
            out |= {b + "ffn_gate_inp.weight": sd[m + "gate.weight"],
                    b + "exp_probs_b.bias": sd[m + "gate.e_score_correction_bias"],
                    b + "ffn_up_exps.weight": sd[m + "experts.up_proj"],
                    b + "ffn_down_exps.weight": sd[m + "experts.down_proj"],
                    b + "ffn_up_shexp.weight": sd[m + "shared_experts.up_proj.weight"],
                    b + "ffn_down_shexp.weight": sd[m + "shared_experts.down_proj.weight"]}
            if config.moe_latent_size:
                out |= {b + "ffn_latent_down.weight": sd[m + "fc1_latent_proj.weight"],
                        b + "ffn_latent_up.weight": sd[m + "fc2_latent_proj.weight"]}
        else:
            out |= {b + "ffn_up.weight": sd[m + "up_proj.weight"], b + "ffn_down.weight": sd[m + "down_proj.weight"]}
    return out


ALWAYS_F32 = ("_norm.weight", ".bias", "ssm_a", "ssm_d", "ffn_gate_inp.weight", "ssm_conv1d.weight")


def read(path) -> tuple[dict, dict]:
    r = gguf.GGUFReader(path)
    return {t.name: t for t in r.tensors}, {k: f.contents() for k, f in r.fields.items()}


def test_names_are_llama_cpps_and_the_mtp_block_is_left_out(files, ours):
    config, sd = ours
    tensors, _ = read(files["f32"])
    assert set(tensors) == set(expected(config, sd))
    # gguf's own name table (llama.cpp's tensor_mapping.py) maps the checkpoint's names to the same ones
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.NEMOTRON_H_MOE, len(config.pattern))
    hf = {"backbone.layers.1.mixer.gate.e_score_correction.bias": "blk.1.exp_probs_b.bias",  # the converter's renames
          "backbone.layers.0.mixer.dt.bias": "blk.0.ssm_dt.bias",
          "model.layers.1.mlp.experts.up_proj.weight": "blk.1.ffn_up_exps.weight",
          "model.layers.4.mlp.experts.down_proj.weight": "blk.4.ffn_down_exps.weight"}
    for name in nemotron3.HybridLM(config).state_dict():
        if name.startswith("backbone.") and ".experts." not in name and "dt_bias" not in name and "e_score" not in name:
            hf[name] = None
    for name, want in hf.items():
        got = names.get_name(name, try_suffixes=(".weight", ".bias"))
        assert got is not None and (want is None or got == want), name
        assert got in tensors, (name, got)
    assert not any("nextn" in n or "mtp" in n for n in tensors)


def test_f32_export_holds_our_tensors_after_the_converters_transforms(files, ours):
    tensors, _ = read(files["f32"])
    for name, want in expected(*ours).items():
        t = tensors[name]
        assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
        assert list(t.shape) == list(reversed(want.shape)), name  # ggml lists dimensions innermost first
        assert torch.equal(torch.from_numpy(np.array(t.data)).reshape(want.shape), want), name


def test_bf16_export_is_our_tensors_rounded_to_bf16(files, ours):
    tensors, _ = read(files["bf16"])
    for name, want in expected(*ours).items():
        t = tensors[name]
        if name.endswith(ALWAYS_F32) or want.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            assert torch.equal(torch.from_numpy(np.array(t.data)).reshape(want.shape), want), name
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.BF16, name
        bits = torch.from_numpy(np.array(t.data).view(np.int16).reshape(want.shape))
        assert torch.equal(bits, want.to(torch.bfloat16).view(torch.int16)), name


def test_q8_0_export_is_within_q8_0s_error_bound(files, ours):
    """Q8_0: blocks of 32 along a row, one fp16 scale d and 32 int8 q; x ~ d*q. With d0 = max|x|/127 (the scale
    before its rounding to fp16), |x - d*q| <= d0/2 + 127*|d0 - d| per block (rounding to the grid, plus the scale's
    own rounding), decoded here from the bytes, not by gguf's dequantizer."""
    tensors, _ = read(files["q8_0"])
    kinds = set()
    for name, want in expected(*ours).items():
        t, x = tensors[name], want.double().numpy()
        if name.endswith(ALWAYS_F32) or want.dim() == 1:
            assert t.tensor_type == gguf.GGMLQuantizationType.F32, name
            continue
        if x.shape[-1] % 32:  # rows that are not whole blocks: f16, as the converter falls back
            assert t.tensor_type == gguf.GGMLQuantizationType.F16, name
            assert np.array_equal(np.array(t.data).reshape(x.shape), want.numpy().astype(np.float16)), name
            kinds.add("f16")
            continue
        assert t.tensor_type == gguf.GGMLQuantizationType.Q8_0, name
        raw = np.array(t.data).reshape(-1, 34)
        d = raw[:, :2].copy().view(np.float16).astype(np.float64)  # (blocks, 1)
        q = raw[:, 2:].copy().view(np.int8).astype(np.float64)     # (blocks, 32)
        blocks = x.reshape(-1, 32)
        d0 = np.abs(blocks).max(axis=1, keepdims=True) / 127
        assert np.array_equal(d.astype(np.float16), (np.abs(want.numpy()).reshape(-1, 32).max(axis=1, keepdims=True)
                                                     / np.float32(127)).astype(np.float16)), name
        err = np.abs(blocks - d * q)
        bound = d0 / 2 + 127 * np.abs(d0 - d) + 1e-6 * d0
        assert (err <= bound).all(), (name, float((err - bound).max()))
        assert (err > 0).any(), name  # it was quantized
        kinds.add("q8_0")
    assert kinds == {"q8_0", "f16"}


def test_metadata_holds_our_hyperparameters_under_llama_cpps_keys(files, ours):
    config, _ = ours
    _, kv = read(files["q8_0"])
    a = "nemotron_h_moe"
    pattern = config.pattern  # MEM*E*ME
    want = {
        "general.architecture": a, "general.file_type": int(gguf.LlamaFileType.MOSTLY_Q8_0),
        f"{a}.block_count": 8, f"{a}.embedding_length": 64, f"{a}.vocab_size": 320,
        f"{a}.attention.head_count": 4, f"{a}.attention.head_count_kv": [1 if c == "*" else 0 for c in pattern],
        f"{a}.attention.key_length": 16, f"{a}.attention.value_length": 16,
        f"{a}.feed_forward_length": [32 if c == "E" else 0 for c in pattern],
        f"{a}.ssm.conv_kernel": 4, f"{a}.ssm.state_size": 8, f"{a}.ssm.group_count": 2, f"{a}.ssm.inner_size": 64,
        f"{a}.ssm.time_step_rank": 8,
        f"{a}.expert_count": 16, f"{a}.expert_used_count": 4, f"{a}.expert_feed_forward_length": 32,
        f"{a}.expert_shared_feed_forward_length": 64, f"{a}.expert_shared_count": 1, f"{a}.expert_weights_norm": True,
        f"{a}.expert_weights_scale": 5.0, f"{a}.expert_group_count": 1, f"{a}.expert_group_used_count": 1,
        f"{a}.moe_latent_size": 24, f"{a}.context_length": 2**20, f"{a}.rope.scaling.finetuned": False,
    }
    for key, value in want.items():
        assert kv[key] == value, key
    assert kv[f"{a}.attention.layer_norm_epsilon"] == pytest.approx(config.layer_norm_epsilon, rel=1e-7)
    assert f"{a}.nextn_predict_layers" not in kv


def test_tokenizer_round_trips(files, source):
    _, kv = read(files["bf16"])
    spec = json.loads((source / "tokenizer.json").read_text())
    by_id = {i: t for t, i in spec["model"]["vocab"].items()} | {a["id"]: a["content"] for a in spec["added_tokens"]}
    assert kv["tokenizer.ggml.model"] == "gpt2" and kv["tokenizer.ggml.pre"] == "starcoder"
    tokens, types = kv["tokenizer.ggml.tokens"], kv["tokenizer.ggml.token_type"]
    assert len(tokens) == len(types) == 320
    assert tokens[:len(by_id)] == [by_id[i] for i in range(len(by_id))]
    assert tokens[len(by_id):] == [f"[PAD{i}]" for i in range(len(by_id), 320)]
    specials = {spec_id for spec_id, t in by_id.items() if t in SPECIAL_TOKENS}
    assert len(specials) == len(SPECIAL_TOKENS)
    for i, t in enumerate(types):
        want = (gguf.TokenType.CONTROL if i in specials else gguf.TokenType.UNUSED if i >= len(by_id)
                else gguf.TokenType.NORMAL)
        assert t == want, (i, tokens[i])
    assert kv["tokenizer.ggml.merges"] == [" ".join(m) if isinstance(m, list) else m for m in spec["model"]["merges"]]
    tok = Tokenizer.load(source)
    assert (kv["tokenizer.ggml.bos_token_id"], kv["tokenizer.ggml.eos_token_id"]) == (tok.bos_id, tok.eos_id)
    assert kv["tokenizer.ggml.add_bos_token"] is True and kv["tokenizer.ggml.add_eos_token"] is False
    assert kv["tokenizer.chat_template"] == json.loads((source / "tokenizer_config.json").read_text())["chat_template"]


def test_dense_mlp_model_is_nemotron_h(tmp_path):
    src = _checkpoint(tmp_path / "dense", TINY_HF_CONFIGS["dense-mlp"])
    path = export(ExportConfig(model=src, outtype="f32", out=tmp_path / "d.gguf"))
    tensors, kv = read(path)
    assert kv["general.architecture"] == "nemotron_h"
    assert kv["nemotron_h.feed_forward_length"] == [96 if c == "-" else 0 for c in "M-*M-"]
    assert "nemotron_h.expert_count" not in kv
    model = nemotron3.load_pretrained(src)
    assert torch.equal(torch.from_numpy(np.array(tensors["blk.1.ffn_up.weight"].data)),
                       model.state_dict()["backbone.layers.1.mixer.up_proj.weight"])


def _cli(capsys, *argv) -> tuple[int, list[str]]:
    try:
        rc = main(["export", *argv])
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    return rc, capsys.readouterr().err.strip().splitlines()


def test_bad_input_fails_with_one_line_and_writes_nothing(source, tmp_path, capsys):
    out = tmp_path / "out" / "m.gguf"
    rc, err = _cli(capsys, "--model", str(source), "--outtype", "q4_0", "--out", str(out))
    assert rc == 2 and "--outtype" in err[0] and "invalid choice: 'q4_0'" in err[0]
    with pytest.raises(ConfigError, match=r"outtype \(--outtype\)"):
        ExportConfig(model=source, outtype="f16", out=out)

    foreign = tmp_path / "llama"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"],
                                                     "hidden_size": 64, "num_hidden_layers": 2}))
    for model in (foreign, tmp_path):  # a model that is not nemotron_h; a folder that is no checkpoint
        rc, err = _cli(capsys, "--model", str(model), "--out", str(out))
        assert rc == 1 and len(err) == 1 and err[0].startswith("error: ") and str(model) in err[0], err

    mixed = _checkpoint(tmp_path / "mixed", TINY_HF_CONFIGS["grouped-routing"])  # *EM-ME*: MoE and dense MLPs
    rc, err = _cli(capsys, "--model", str(mixed), "--out", str(out))
    assert rc == 1 and len(err) == 1 and "'pattern'" in err[0] and "nemotron_h_moe" in err[0], err

    (tmp_path / "notok").mkdir()
    for f in ("config.json", "model.safetensors"):
        (tmp_path / "notok" / f).write_bytes((source / f).read_bytes())
    rc, err = _cli(capsys, "--model", str(tmp_path / "notok"), "--out", str(out))
    assert rc == 1 and len(err) == 1 and "tokenizer.json" in err[0], err
    assert not out.parent.exists() or not any(out.parent.iterdir())  # no file, no temporary left behind

    out.parent.mkdir(exist_ok=True)
    out.write_bytes(b"keep")
    rc, err = _cli(capsys, "--model", str(source), "--out", str(out))
    assert rc == 1 and len(err) == 1 and "--overwrite" in err[0] and out.read_bytes() == b"keep"
    assert _cli(capsys, "--model", str(source), "--out", str(out), "--overwrite", "--outtype", "f32")[0] == 0
    assert read(out)[1]["general.file_type"] == int(gguf.LlamaFileType.ALL_F32)
    assert sorted(p.name for p in out.parent.iterdir()) == ["m.gguf"]


@pytest.mark.slow
def test_llama_cpp_generates_our_greedy_tokens(tmp_path):
    """llama.cpp (llama-cpp-python) on the f32 export: its logits at the prompt's end match ours, and its greedy
    tokens are ours, up to a position where our top-2 logits are within float noise of a tie (if any)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    hf = {**TINY_HF_CONFIGS["latent-2groups"], "vocab_size": 320, "num_nextn_predict_layers": 1}
    src = _checkpoint(tmp_path / "ckpt", hf, seed=3)
    model = nemotron3.load_pretrained(src, dtype=torch.float32)
    with torch.no_grad():  # dt well above the clamp at time_step_min that we apply and llama.cpp does not
        for m in model.modules():
            if hasattr(m, "dt_bias"):
                m.dt_bias.copy_(-1.0 + 0.3 * torch.randn(m.dt_bias.shape, generator=torch.Generator().manual_seed(0)))
    nemotron3.save_pretrained(model, src)
    path = export(ExportConfig(model=src, outtype="f32", out=tmp_path / "m.gguf"))
    tok = Tokenizer.load(src)
    for text in ("the cat ate the hat", "12 + 30 = 42", "<|im_start|>user\nhi<|im_end|>"):
        llm_ids = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False).tokenize(
            text.encode(), add_bos=False, special=True)
        assert llm_ids == tok.encode(text), text

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, n_batch=256, n_threads=2, logits_all=True, verbose=False)
    prompt = [tok.bos_id, *tok.encode("the cat sat on the mat, then")]
    n = 32
    ours = nemotron3.Engine(model, max_seq_len=256).generate([prompt], n, stop_token_ids=[]).tokens[0]
    llm.reset()
    llm.eval(prompt)
    first = np.array(llm.scores[llm.n_tokens - 1], dtype=np.float64)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + ours]))[0].double()  # (T, V)
    np.testing.assert_allclose(first, logits[len(prompt) - 1].numpy(), atol=1e-3, rtol=1e-3)
    theirs = []
    for _ in range(n):
        theirs.append(int(np.argmax(llm.scores[llm.n_tokens - 1])))
        llm.eval([theirs[-1]])
    split = next((i for i, (a, b) in enumerate(zip(ours, theirs)) if a != b), None)
    if split is not None:
        top2 = logits[len(prompt) - 1 + split].topk(2).values
        assert float(top2[0] - top2[1]) < 1e-4, (split, ours, theirs)
        assert split >= 8, (split, ours, theirs)
