"""`nemotron3.checkpoint.open(folder, device, dtype) -> (model, tokenizer)`, the way every command opens a folder
(issue 30): the same weights as the files hold (read back with safetensors itself, the independent reader) and the
same tokenizer as the one saved; device and dtype honoured; a folder whose quantization it cannot read, or whose
scale tensor has the wrong shape, refused in one line naming the file and the tensor."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import eval_checkpoint
from safetensors.torch import load_file, save_file

import nemotron3
from nemotron3 import checkpoint, hf
from nemotron3.cli import main
from nemotron3.quant.packed import PackedLinear
from nemotron3.stages.quantize import QuantizeConfig, quantize
from nemotron3.tokenizer import Tokenizer

TEXT = "What is 7 * 6? It is 42. The answer is B."


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny model (Mamba, attention, MoE with its fp32 router bias) saved with its tokenizer by checkpoint.save."""
    source = tmp_path_factory.mktemp("src")
    model, tok = eval_checkpoint(source)
    folder = tmp_path_factory.mktemp("ckpt") / "tiny"
    checkpoint.save(model, folder, tok)
    return folder, model, tok


def test_open_gives_the_weights_in_the_files_and_the_saved_tokenizer(saved):
    folder, model, tok = saved
    opened, opened_tok = checkpoint.open(folder)
    on_disk = load_file(str(folder / "model.safetensors"))          # safetensors' own reader, not ours
    ours = dict(hf.state_dict_for_disk(opened))
    assert ours.keys() == on_disk.keys() == dict(hf.state_dict_for_disk(model)).keys()
    for name, t in on_disk.items():
        assert torch.equal(ours[name], t), name                      # fp32 written, fp32 read: exact
    # the old path (load_pretrained + Tokenizer.load) gives the same
    old = nemotron3.load_pretrained(folder)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), opened.state_dict().values()))
    assert isinstance(opened_tok, Tokenizer)
    assert opened_tok.vocab_size == tok.vocab_size
    assert opened_tok.encode(TEXT) == tok.encode(TEXT) == Tokenizer.load(folder).encode(TEXT)
    assert (opened_tok.bos_id, opened_tok.eos_id) == (tok.bos_id, tok.eos_id)
    assert not opened.training


@pytest.mark.parametrize("dtype", [torch.bfloat16, "bfloat16"])
def test_dtype_casts_all_but_what_the_policy_keeps_fp32(saved, dtype):
    folder, model, _ = saved
    opened, _ = checkpoint.open(folder, dtype=dtype)
    reference = model.state_dict()
    kept = [n for n in reference if n.endswith(hf.FP32_ALWAYS)]
    assert kept, "the tiny model has MoE routers: their correction bias is what the policy keeps in fp32"
    for name, t in opened.state_dict().items():
        if not t.is_floating_point():
            continue
        want = torch.float32 if name.endswith(hf.FP32_ALWAYS) else torch.bfloat16
        assert t.dtype == want, name
        assert torch.equal(t, reference[name].to(want)), name     # a cast of the saved fp32 value: exact


def test_device_is_where_every_tensor_goes(saved):
    folder, _, _ = saved
    devices = ["meta", "cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for device in devices:
        opened, _ = checkpoint.open(folder, device=device)
        where = {t.device.type for t in [*opened.parameters(), *opened.buffers()]}
        assert where == {torch.device(device).type}, (device, where)


def test_a_folder_without_a_tokenizer_opens_with_none_unless_one_is_required(saved, tmp_path):
    folder, _, _ = saved
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copyfile(folder / name, bare / name)
    model, tok = checkpoint.open(bare)
    assert tok is None and isinstance(model, nemotron3.HybridLM)
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        checkpoint.open(bare, require_tokenizer=True)
    with pytest.raises(checkpoint.CheckpointError, match="not a checkpoint folder"):
        checkpoint.open(tmp_path)


@pytest.fixture(scope="module")
def quantized(saved, tmp_path_factory):
    folder, _, _ = saved
    return quantize(QuantizeConfig(model=folder, out=tmp_path_factory.mktemp("q") / "w4a16", scheme="nvfp4-w4a16"))


def test_weight_only_schemes_stay_packed_unless_dequantized(quantized):
    packed, _ = checkpoint.open(quantized)
    dense, tok = checkpoint.open(quantized, dequantize=True)
    assert any(isinstance(m, PackedLinear) for m in packed.modules())
    assert not any(isinstance(m, PackedLinear) for m in dense.modules())
    assert tok is not None  # quantize copies the tokenizer


def _one_line_error(capsys, folder) -> str:
    assert main(["generate", "--model", str(folder), "--ids", "1,2", "--max-new-tokens", "1"]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


def test_an_unknown_quant_method_names_the_config_file(quantized, tmp_path, capsys):
    bad = tmp_path / "gptq"
    shutil.copytree(quantized, bad)
    raw = json.loads((bad / "config.json").read_text())
    raw["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (bad / "config.json").write_text(json.dumps(raw))
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.open(bad)
    assert str(bad / "config.json") in str(e.value) and "'gptq'" in str(e.value) and "\n" not in str(e.value)
    assert str(bad / "config.json") in _one_line_error(capsys, bad)


def test_a_scale_of_the_wrong_shape_names_the_file_and_tensor(quantized, tmp_path, capsys):
    bad = tmp_path / "scale"
    shutil.copytree(quantized, bad)
    tensors = load_file(str(bad / "model.safetensors"))
    name = next(k for k in sorted(tensors) if k.endswith(".mixer.in_proj.weight_scale"))
    tensors[name] = tensors[name][:, :-1].contiguous()     # one block scale short per row
    save_file(tensors, str(bad / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(checkpoint.CheckpointError) as e:
        checkpoint.open(bad)
    message = str(e.value)
    assert str(bad / "model.safetensors") in message and name in message and "\n" not in message, message
    err = _one_line_error(capsys, bad)
    assert str(bad / "model.safetensors") in err and name in err


def test_the_layouts_are_a_table_not_a_registry():
    assert set(checkpoint.SCHEMES) == {"modelopt", "compressed-tensors", "nemotron3"}
    assert not hasattr(hf, "register_quantized_reader")
