"""A HybridLM as llama.cpp's `nemotron_h_moe` (or `nemotron_h`) GGUF: tensor names, layouts, types and metadata.

This mirrors llama.cpp's converter (convert_hf_to_gguf.py, its NemotronHModel class with the GraniteHybrid,
Mamba2 and Llama classes it inherits from), transform for transform, so that the file is the one that converter
would write from the same checkpoint, and llama.cpp's loader (src/models/nemotron-h.cpp) reads it:

    backbone.embeddings.weight          token_embd.weight
    layers.N.norm.weight                blk.N.attn_norm.weight
    mixer.in_proj / out_proj            blk.N.ssm_in / ssm_out
    mixer.conv1d.weight (C, 1, K)       blk.N.ssm_conv1d.weight (C, K)           squeezed
    mixer.conv1d.bias, dt_bias          blk.N.ssm_conv1d.bias, blk.N.ssm_dt.bias
    mixer.A_log (h,)                    blk.N.ssm_a (h, 1) = -exp(A_log)         no ".weight" suffix
    mixer.D (h,)                        blk.N.ssm_d (h, 1)
    mixer.norm.weight (d_inner,)        blk.N.ssm_norm.weight (n_groups, d_inner / n_groups)   the grouped RMSNorm
    mixer.q_proj / k_proj               blk.N.attn_q / attn_k, rows permuted per head as Llama's RoPE layout
                                        (`_permute`; the same permutation of q and k leaves q·k unchanged)
    mixer.v_proj / o_proj               blk.N.attn_v / attn_output
    mixer.gate.weight                   blk.N.ffn_gate_inp.weight                the router
    mixer.gate.e_score_correction_bias  blk.N.exp_probs_b.bias
    mixer.experts.{up,down}_proj        blk.N.ffn_{up,down}_exps.weight          (E, out, in): our stacked layout
    mixer.shared_experts.{up,down}_proj blk.N.ffn_{up,down}_shexp.weight
    mixer.fc1_latent_proj / fc2_...     blk.N.ffn_latent_down / ffn_latent_up    LatentMoE
    mixer.up_proj / down_proj           blk.N.ffn_up / ffn_down                  dense relu² MLP (`nemotron_h`)
    backbone.norm_f.weight, lm_head     output_norm.weight, output.weight

Types follow the converter's rules: 1-D tensors, `*_norm.weight`, the router, the conv and anything without a
`.weight` suffix stay F32; the rest take `--outtype`, and a q8_0 tensor whose rows are not a multiple of 32 wide
falls back to F16 (gguf's QuantError, as the converter does).

The MTP block (`mtp.*`) is not written: gguf 0.19.0's NEMOTRON_H_MOE tensor list has no NextN tensors, and
llama.cpp's converter drops it too with `--no-mtp` (earlier converters always did). A file without it loads in
every llama.cpp that knows nemotron_h_moe.
"""

from __future__ import annotations

from collections.abc import Iterator

import gguf
import numpy as np
import torch

from nemotron3.config import ModelConfig

T = gguf.MODEL_TENSOR
OUTTYPES = {  # --outtype -> (tensor type of the weights, the file's general.file_type)
    "f32": (gguf.GGMLQuantizationType.F32, gguf.LlamaFileType.ALL_F32),
    "bf16": (gguf.GGMLQuantizationType.BF16, gguf.LlamaFileType.MOSTLY_BF16),
    "q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}
_ALWAYS_F32 = (T.FFN_GATE_INP, T.SSM_CONV1D)  # the converter's "some tensor types are always in float32" here
CONTEXT_LENGTH = 2**20  # GraniteHybrid's value for a hybrid without RoPE: the context is not bounded by positions


def arch_of(config: ModelConfig) -> gguf.MODEL_ARCH:
    """nemotron_h_moe for a model with MoE layers, nemotron_h for one with dense MLPs; refuse what llama.cpp
    would compute differently from us, naming the config field."""
    kinds = set(config.pattern)
    if "E" in kinds and "-" in kinds:
        raise NotImplementedError(
            f"config field 'pattern' = {config.pattern!r} mixes MoE ('E') and dense MLP ('-') layers; llama.cpp's "
            "nemotron_h_moe treats every feed-forward layer as MoE, so it cannot run this model")
    if "E" in kinds and config.n_group > 1 and config.topk_group >= config.n_group:
        raise NotImplementedError(
            f"config fields 'n_group' = {config.n_group}, 'topk_group' = {config.topk_group}: llama.cpp requires "
            "topk_group < n_group when experts are grouped")
    if config.sliding_window is not None:
        raise NotImplementedError(f"config field 'sliding_window' = {config.sliding_window}: llama.cpp's "
                                  "nemotron_h attends to the whole context")
    if config.mamba_proj_bias or config.use_bias or config.mlp_bias:
        raise NotImplementedError("config fields 'mamba_proj_bias' / 'use_bias' / 'mlp_bias': llama.cpp's "
                                  "nemotron_h_moe has no biases on these projections")
    return gguf.MODEL_ARCH.NEMOTRON_H_MOE if "E" in kinds else gguf.MODEL_ARCH.NEMOTRON_H


def _name(kind: gguf.MODEL_TENSOR, bid: int | None = None, suffix: str = ".weight") -> str:
    return gguf.TENSOR_NAMES[kind].format(bid=bid) + suffix


def _permute(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """LlamaModel.permute: within each head, rows (first half, second half) interleaved."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(state: dict[str, torch.Tensor], config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(GGUF name, float32 tensor in llama.cpp's layout) for every tensor of the backbone, in file order."""
    def get(name: str) -> torch.Tensor:
        return state[name].detach().to("cpu", torch.float32)

    yield _name(T.TOKEN_EMBD), get("backbone.embeddings.weight")
    for i, kind in enumerate(config.pattern):
        p = f"backbone.layers.{i}."
        yield _name(T.ATTN_NORM, i), get(p + "norm.weight")
        m = p + "mixer."
        if kind == "M":
            yield _name(T.SSM_IN, i), get(m + "in_proj.weight")
            yield _name(T.SSM_CONV1D, i), get(m + "conv1d.weight").squeeze()
            if m + "conv1d.bias" in state:
                yield _name(T.SSM_CONV1D, i, ".bias"), get(m + "conv1d.bias")
            yield _name(T.SSM_DT, i, ".bias"), get(m + "dt_bias")
            yield _name(T.SSM_A, i, ""), (-torch.exp(get(m + "A_log"))).squeeze().reshape(-1, 1)
            yield _name(T.SSM_D, i, ""), get(m + "D").squeeze().reshape(-1, 1)
            yield _name(T.SSM_NORM, i), get(m + "norm.weight").reshape(config.n_groups, -1)
            yield _name(T.SSM_OUT, i), get(m + "out_proj.weight")
        elif kind == "*":
            yield _name(T.ATTN_Q, i), _permute(get(m + "q_proj.weight"), config.num_attention_heads)
            yield _name(T.ATTN_K, i), _permute(get(m + "k_proj.weight"), config.num_key_value_heads)
            yield _name(T.ATTN_V, i), get(m + "v_proj.weight")
            yield _name(T.ATTN_OUT, i), get(m + "o_proj.weight")
        elif kind == "E":
            yield _name(T.FFN_GATE_INP, i), get(m + "gate.weight")
            yield _name(T.FFN_EXP_PROBS_B, i, ".bias"), get(m + "gate.e_score_correction_bias")
            if config.moe_latent_size is not None:
                yield _name(T.MOE_LATENT_DOWN, i), get(m + "fc1_latent_proj.weight")
                yield _name(T.MOE_LATENT_UP, i), get(m + "fc2_latent_proj.weight")
            yield _name(T.FFN_UP_EXP, i), get(m + "experts.up_proj")
            yield _name(T.FFN_DOWN_EXP, i), get(m + "experts.down_proj")
            if config.n_shared_experts:
                yield _name(T.FFN_UP_SHEXP, i), get(m + "shared_experts.up_proj.weight")
                yield _name(T.FFN_DOWN_SHEXP, i), get(m + "shared_experts.down_proj.weight")
        else:  # "-"
            yield _name(T.FFN_UP, i), get(m + "up_proj.weight")
            yield _name(T.FFN_DOWN, i), get(m + "down_proj.weight")
    yield _name(T.OUTPUT_NORM), get("backbone.norm_f.weight")
    if "lm_head.weight" in state and not config.tie_word_embeddings:
        yield _name(T.OUTPUT), get("lm_head.weight")  # absent: llama.cpp reads token_embd in its place


def tensor_type(name: str, ndim: int, outtype: str) -> gguf.GGMLQuantizationType:
    """The converter's choice for one tensor (prepare_tensors): F32 for what llama.cpp only handles in F32."""
    if ndim <= 1 or name.endswith("_norm.weight") or not name.endswith(".weight"):
        return gguf.GGMLQuantizationType.F32
    bid = int(name.split(".")[1]) if name.startswith("blk.") else None
    if bid is not None and name in {_name(kind, bid) for kind in _ALWAYS_F32}:
        return gguf.GGMLQuantizationType.F32
    return OUTTYPES[outtype][0]


def encode(t: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> tuple[np.ndarray, gguf.GGMLQuantizationType]:
    """The tensor's bytes (or float32 array) in `qtype`, through gguf's own quantizer; rows that do not fill
    whole blocks fall back to F16, as the converter does."""
    data = t.contiguous().numpy()
    try:
        return gguf.quants.quantize(data, qtype), qtype
    except gguf.QuantError:
        return gguf.quants.quantize(data, gguf.GGMLQuantizationType.F16), gguf.GGMLQuantizationType.F16


def add_metadata(w: gguf.GGUFWriter, config: ModelConfig, outtype: str, name: str) -> None:
    """The model's hyperparameters under the keys the converter writes (last value where it writes one twice)."""
    moe = "E" in config.pattern
    n = len(config.pattern)
    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(name)
    w.add_block_count(n)
    w.add_context_length(CONTEXT_LENGTH)
    w.add_embedding_length(config.hidden_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv([config.num_key_value_heads if c == "*" else 0 for c in config.pattern])
    w.add_key_length(config.head_dim)
    w.add_value_length(config.head_dim)
    w.add_layer_norm_eps(config.layer_norm_epsilon)
    w.add_vocab_size(config.vocab_size)
    w.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)  # unused: no RoPE here
    w.add_rope_scaling_finetuned(False)
    if (theta := config.extra.get("rope_theta")) is not None:
        w.add_rope_freq_base(float(theta))
    w.add_ssm_conv_kernel(config.conv_kernel)
    w.add_ssm_state_size(config.ssm_state_size)
    w.add_ssm_group_count(config.n_groups)
    w.add_ssm_inner_size(config.mamba_num_heads * config.mamba_head_dim)
    w.add_ssm_time_step_rank(config.mamba_num_heads)
    if moe:
        w.add_feed_forward_length([config.moe_intermediate_size if c == "E" else 0 for c in config.pattern])
        w.add_expert_count(config.n_routed_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_group_count(config.n_group)
        w.add_expert_group_used_count(config.topk_group)
        w.add_expert_feed_forward_length(config.moe_intermediate_size)
        w.add_expert_shared_feed_forward_length(config.moe_shared_expert_intermediate_size)
        w.add_expert_shared_count(config.n_shared_experts)
        w.add_expert_weights_norm(config.norm_topk_prob)
        w.add_expert_weights_scale(config.routed_scaling_factor)
        if config.moe_latent_size is not None:
            w.add_moe_latent_size(config.moe_latent_size)
    else:
        w.add_feed_forward_length([config.intermediate_size if c == "-" else 0 for c in config.pattern])
    w.add_file_type(OUTTYPES[outtype][1])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
