"""convert_to_nvfp4: the Super policy picks the right layers, training still works, and the switch back is exact."""

from __future__ import annotations

import torch
from torch import nn

import nemotron3
from nemotron3 import ModelConfig
from nemotron3.quant import MXFP8Linear, NVFP4Linear
from nemotron3.quant.convert import PrecisionPolicy, convert_to_nvfp4, precision_summary, switch_to_high_precision


def test_super_policy_on_the_meta_device():
    with torch.device("meta"):
        model = nemotron3.HybridLM(ModelConfig.preset("super-120b-a12b"))
    convert_to_nvfp4(model)
    kinds = {name: type(m) for name, m in model.named_modules()}
    assert kinds["backbone.layers.0.mixer.in_proj"] is NVFP4Linear
    assert kinds["backbone.layers.0.mixer.out_proj"] is MXFP8Linear
    assert kinds["backbone.layers.1.mixer.shared_experts.up_proj"] is NVFP4Linear
    assert kinds["backbone.layers.1.mixer.fc1_latent_proj"] is nn.Linear
    assert kinds["backbone.layers.7.mixer.q_proj"] is nn.Linear
    assert kinds["lm_head"] is nn.Linear and kinds["mtp.layers.1.mixer.shared_experts.up_proj"] is nn.Linear
    # the last 14 of 88 layers (ceil(0.15 * 88)) stay high precision, layer 73 is still quantized
    assert kinds["backbone.layers.73.mixer.in_proj"] is NVFP4Linear
    assert kinds["backbone.layers.74.mixer.shared_experts.up_proj"] is nn.Linear
    assert kinds["backbone.layers.75.mixer.in_proj"] is nn.Linear
    assert kinds["backbone.layers.72.mixer.shared_experts.up_proj"] is NVFP4Linear
    assert "gemm_quantizer" in model.backbone.layers[1].mixer.experts.__dict__
    assert "gemm_quantizer" not in model.backbone.layers[76].mixer.experts.__dict__
    summary = precision_summary(model)
    assert summary["nvfp4"] > 0.7 * sum(summary.values())  # the experts dominate


def test_converted_model_is_close_trains_and_switches_back_exactly(tmp_path):
    torch.manual_seed(0)
    model = nemotron3.HybridLM(ModelConfig.preset("tiny").replace(num_nextn_predict_layers=0))
    ids = torch.randint(0, 2048, (2, 40))
    with torch.no_grad():
        ref = model(ids)
    params_before = dict(model.named_parameters())
    convert_to_nvfp4(model, PrecisionPolicy(high_precision_tail=0.0))
    assert dict(model.named_parameters()) == params_before  # same Parameter objects, same names
    with torch.no_grad():
        q = model(ids)
    rel = (q - ref).norm() / ref.norm()
    assert 0 < rel < 0.25, rel  # quantized, but the same function within FP4 error
    loss = torch.nn.functional.cross_entropy(model(ids).flatten(0, 1), ids.flatten())
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in model.named_parameters()
               if "mtp" not in n and "correction" not in n)
    assert model.backbone.layers[1].mixer.experts.up_proj.grad.abs().sum() > 0
    nemotron3.save_pretrained(model, tmp_path)  # names unchanged: loads as a plain model
    switch_to_high_precision(model)
    assert not any(isinstance(m, (NVFP4Linear, MXFP8Linear)) for m in model.modules())
    with torch.no_grad():
        # exact by construction: back to plain Linear with unchanged weights, the same kernels as `ref`
        torch.testing.assert_close(model(ids), ref, atol=0, rtol=0)
        torch.testing.assert_close(nemotron3.load_pretrained(tmp_path)(ids), ref, atol=0, rtol=0)
