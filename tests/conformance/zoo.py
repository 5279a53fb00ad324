"""The conformance zoo: every architecture the matrix runs, each built small from a config.

An ``Arch`` says how to build the model (random weights, seeded by the caller), how to make a
call's inputs at a batch size and length, the sizes of the fixed batch and of a second, new
shape (the ONNX check), whether it has attention (prompt methods apply only then, but for prompt
tuning and P-tuning on a state-space model's tokens), the weight methods it offers no site for
(``refuses``) and the task type PEFT would need for its prompt methods (None: PEFT has none for
this kind of model). Nothing here downloads anything. The
builders the rest of the tests use too (GPT-2, Llama, OPT, BERT, T5, ViT, wav2vec 2.0, the conformer,
the functional modules, the causal-LM families) come from the shared zoo, tests/model_zoo.py.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn

TESTS = str(Path(__file__).resolve().parents[1])
if TESTS not in sys.path:  # tests/, for the shared zoo: pytest's conftest puts it there, report.py (a script) does not
    sys.path.insert(0, TESTS)
from model_zoo import (  # noqa: E402
    BERT,
    CAUSAL_LMS,
    VOCAB,
    WAV2VEC2,
    FunctionalConvNet,
    FunctionalSDPA,
    conformer_inputs,
    tiny_bert,
    tiny_conformer,
    tiny_gpt2,
    tiny_llama,
    tiny_opt,
    tiny_t5,
    tiny_timm_vit,
    tiny_torchaudio_wav2vec2,
    tiny_vit,
    tiny_wav2vec2,
)


@dataclass(frozen=True)
class Arch:
    id: str
    family: str  # transformers | timm | torchaudio | custom
    kind: str  # what it is, for the table
    build: Callable[[], nn.Module]
    inputs: Callable[[int, int], Any]
    sizes: tuple[int, int]
    other: tuple[int, int]  # a new batch size and, where the model allows, a new length
    attention: bool = True
    peft_task: str | None = None
    # The model fixes its sequence length: it reshapes the tokens into an image grid (windows, spatial-reduction
    # attention, LeViT's subsampling). Extra tokens cannot fit, so prompt tuning and P-tuning do not apply and must
    # be refused with the clear error. (Whisper's encoder, whose input has one length, is not such a model: its
    # position embeddings are added before the first attention, where the virtual tokens go in.)
    fixed_sequence: bool = False
    # Tokens mixed by a state-space scan, not attention (Mamba): prompt tuning and P-tuning extend its token
    # sequence; prefix tuning (keys and values in front of each attention's) does not apply and must be refused.
    state_space: bool = False
    # The weight methods the model offers no site for, each refused at inject with its clear TargetError:
    # "ln_tuning" (no layer / RMS / group norm with a learned weight: batch norms only, or none at all),
    # "bottleneck" (no residual addition of a linear sublayer's output: no transformer-style blocks),
    # "vera" (no linear op that "all-linear" selects: the head is left out, and 1x1 convolutions are not linear ops).
    refuses: tuple[str, ...] = ()


def ids(b: int, t: int) -> dict:
    return {"input_ids": torch.randint(0, VOCAB, (b, t))}


def ids_mask(b: int, t: int) -> dict:
    return {"input_ids": torch.randint(0, VOCAB, (b, t)), "attention_mask": torch.ones(b, t, dtype=torch.long)}


def causal(b: int, t: int) -> dict:
    return {"input_ids": torch.randint(0, VOCAB, (b, t)), "use_cache": False}


def seq2seq(b: int, t: int) -> dict:
    return {"input_ids": torch.randint(0, VOCAB, (b, t)), "decoder_input_ids": torch.randint(0, VOCAB, (b, t - 2)),
            "use_cache": False}


def pixels(b: int, s: int) -> dict:
    return {"pixel_values": torch.randn(b, 3, s, s)}


def image(b: int, s: int) -> tuple:
    return (torch.randn(b, 3, s, s),)


def values(b: int, n: int) -> dict:
    return {"input_values": torch.randn(b, n)}


def waveform(b: int, n: int) -> tuple:
    return (torch.randn(b, n),)


TEXT = dict(sizes=(2, 8), other=(3, 11))


# --- transformers -------------------------------------------------------------------------------

def _hf(cls: Any, config_cls: Any, **config: Any) -> Callable[[], nn.Module]:
    return lambda: cls(config_cls(**config))


# LAYER_SCALE: ConvNeXt initialises its per-block layer scale to 1e-6, so at init any change inside a block
# (an adapter on its MLP) moves the output by ~1e-13, below float32 resolution. Trained ConvNeXts have scales
# of order 0.1-1; the zoo uses 0.5 so that the adapters' effect is measurable.

TRANSFORMERS = [
    Arch("gpt2", "transformers", "decoder", tiny_gpt2, causal, **TEXT, peft_task="CAUSAL_LM"),
    Arch("llama", "transformers", "decoder, grouped-query attention", tiny_llama, causal, **TEXT,
         peft_task="CAUSAL_LM"),
    Arch("qwen2", "transformers", "decoder, grouped-query attention", _hf(
        tf.Qwen2ForCausalLM, tf.Qwen2Config, vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=64),
        causal, **TEXT, peft_task="CAUSAL_LM"),
    Arch("opt", "transformers", "decoder", tiny_opt, causal, **TEXT, peft_task="CAUSAL_LM"),
    Arch("bert", "transformers", "encoder", tiny_bert, ids_mask, **TEXT, peft_task="SEQ_CLS"),
    Arch("roberta", "transformers", "encoder", _hf(
        tf.RobertaForSequenceClassification, tf.RobertaConfig, **{**BERT, "max_position_embeddings": 80}),
        ids_mask, **TEXT, peft_task="SEQ_CLS"),
    Arch("distilbert", "transformers", "encoder", _hf(
        tf.DistilBertForSequenceClassification, tf.DistilBertConfig, vocab_size=VOCAB, dim=32, n_layers=2,
        n_heads=4, hidden_dim=64, max_position_embeddings=64, num_labels=3),
        ids_mask, **TEXT, peft_task="SEQ_CLS"),
    Arch("t5", "transformers", "encoder-decoder", tiny_t5, seq2seq, **TEXT, peft_task="SEQ_2_SEQ_LM"),
    Arch("bart", "transformers", "encoder-decoder", _hf(
        tf.BartForConditionalGeneration, tf.BartConfig, vocab_size=VOCAB, d_model=32, encoder_layers=2,
        decoder_layers=2, encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64),
        seq2seq, **TEXT, peft_task="SEQ_2_SEQ_LM"),
    Arch("hf-vit", "transformers", "vision transformer", tiny_vit, pixels, (2, 32), (3, 32)),
    Arch("hf-deit", "transformers", "vision transformer, distillation token", _hf(
        tf.DeiTForImageClassificationWithTeacher, tf.DeiTConfig, image_size=32, patch_size=8, hidden_size=32,
        num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, num_labels=5),
        pixels, (2, 32), (3, 32)),
    Arch("hf-swin", "transformers", "hierarchical vision transformer", _hf(
        tf.SwinForImageClassification, tf.SwinConfig, image_size=32, patch_size=4, embed_dim=16, depths=[1, 1],
        num_heads=[2, 2], window_size=4, num_labels=5),
        pixels, (2, 32), (3, 32), fixed_sequence=True),
    Arch("hf-convnext", "transformers", "convolutional", _hf(
        tf.ConvNextForImageClassification, tf.ConvNextConfig, num_stages=2, hidden_sizes=[8, 16], depths=[1, 1], num_labels=5,
        layer_scale_init_value=0.5),  # see LAYER_SCALE
        pixels, (2, 32), (3, 48), attention=False, refuses=("bottleneck",)),  # its residuals add a layer scale's output
    Arch("hf-segformer", "transformers", "hierarchical vision transformer, reduced-key attention", _hf(
        tf.SegformerForImageClassification, tf.SegformerConfig, num_encoder_blocks=2, depths=[1, 1],
        sr_ratios=[2, 1], hidden_sizes=[16, 32], patch_sizes=[7, 3], strides=[4, 2], num_attention_heads=[1, 2],
        mlp_ratios=[2, 2], num_labels=5),
        pixels, (2, 32), (3, 32), fixed_sequence=True),
    Arch("hf-wav2vec2", "transformers", "audio encoder", tiny_wav2vec2, values, (2, 1600), (3, 2400)),
    Arch("hf-hubert", "transformers", "audio encoder", _hf(tf.HubertForCTC, tf.HubertConfig, **WAV2VEC2),
         values, (2, 1600), (3, 2400)),
    Arch("whisper-encoder", "transformers", "audio encoder (Whisper's, with a classifier head)", _hf(
        tf.WhisperForAudioClassification, tf.WhisperConfig, num_mel_bins=8, d_model=32, encoder_layers=2,
        encoder_attention_heads=4, encoder_ffn_dim=64, decoder_layers=1, decoder_attention_heads=4,
        decoder_ffn_dim=64, max_source_positions=16, max_target_positions=16, vocab_size=VOCAB, num_labels=3, pad_token_id=0,
        bos_token_id=1, eos_token_id=2, decoder_start_token_id=1),
        lambda b, t: {"input_features": torch.randn(b, 8, t)}, (2, 32), (3, 32)),  # Whisper takes a fixed length
]


# --- the LLM families people fine-tune (decoders, mixture-of-experts, state-space), Whisper, CLIP ---------------
# The shared zoo's causal LMs (2 layers, hidden 64, vocab 96) where it has the family; the rest at the same size.

_LM = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
WHISPER = dict(num_mel_bins=8, d_model=32, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64,
               decoder_layers=2, decoder_attention_heads=4, decoder_ffn_dim=64, max_source_positions=16,
               max_target_positions=32, vocab_size=VOCAB, pad_token_id=0, bos_token_id=1, eos_token_id=2,
               decoder_start_token_id=1)
CLIP_TOWERS = dict(
    text_config=dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, max_position_embeddings=32, bos_token_id=1, eos_token_id=2),
    vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       image_size=32, patch_size=8),
    projection_dim=16)


def _lm(name: str, kind: str, build: Callable[[], nn.Module], **kwargs: Any) -> Arch:
    return Arch(name, "transformers", kind, build, causal, **TEXT, peft_task="CAUSAL_LM", **kwargs)


def whisper_inputs(b: int, t: int) -> dict:
    """Log-mel features of the fixed 32 frames Whisper's encoder takes, and ``t`` decoder tokens."""
    return {"input_features": torch.randn(b, 8, 32), "decoder_input_ids": torch.randint(0, VOCAB, (b, t)),
            "use_cache": False}


def clip_inputs(b: int, t: int) -> dict:
    return {"input_ids": torch.randint(0, VOCAB, (b, t)), "pixel_values": torch.randn(b, 3, 32, 32)}


LLMS = [
    _lm("falcon", "decoder, new decoder architecture (grouped key/value heads)", CAUSAL_LMS["falcon"]),
    _lm("falcon-old", "decoder, multi-query, parallel attention + MLP", CAUSAL_LMS["falcon-old"]),
    _lm("mpt", "decoder, ALiBi", CAUSAL_LMS["mpt"]),
    _lm("gpt-neox", "decoder, partial rotary, parallel residual", CAUSAL_LMS["gpt-neox"]),
    _lm("mistral", "decoder, sliding window (8 tokens)", CAUSAL_LMS["mistral-short-window"]),
    _lm("gemma2", "decoder, soft-capping, local/global layers", CAUSAL_LMS["gemma2"]),
    _lm("gemma3", "decoder, local (4-token window)/global layers, QK-norm, final soft-capping", _hf(
        tf.Gemma3ForCausalLM, tf.Gemma3TextConfig, **_LM, intermediate_size=128, head_dim=16,
        query_pre_attn_scalar=16, sliding_window=4, layer_types=["sliding_attention", "full_attention"],
        final_logit_softcapping=30.0)),
    _lm("phi3", "decoder, fused qkv and gate/up projections", CAUSAL_LMS["phi3"]),
    _lm("qwen3", "decoder, QK-norm", CAUSAL_LMS["qwen3"]),
    _lm("mixtral", "mixture-of-experts decoder", CAUSAL_LMS["mixtral"]),
    _lm("qwen3-moe", "mixture-of-experts decoder, QK-norm", _hf(
        tf.Qwen3MoeForCausalLM, tf.Qwen3MoeConfig, **_LM, intermediate_size=128, head_dim=16,
        moe_intermediate_size=32, num_experts=4, num_experts_per_tok=2)),
    _lm("deepseek-v3", "mixture-of-experts decoder, multi-head latent attention, shared expert", _hf(
        tf.DeepseekV3ForCausalLM, tf.DeepseekV3Config, **{**_LM, "num_key_value_heads": 4}, intermediate_size=128,
        moe_intermediate_size=32, n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1,
        topk_group=1, first_k_dense_replace=1, kv_lora_rank=16, q_lora_rank=32, qk_rope_head_dim=8,
        qk_nope_head_dim=8, v_head_dim=16)),
    _lm("gpt-oss", "mixture-of-experts decoder, attention sinks, sliding window (4 tokens)", _hf(
        tf.GptOssForCausalLM, tf.GptOssConfig, **_LM, intermediate_size=64, head_dim=16, num_local_experts=4,
        num_experts_per_tok=2, sliding_window=4)),
    _lm("falcon-mamba", "state-space (Mamba, no attention)", _hf(
        tf.FalconMambaForCausalLM, tf.FalconMambaConfig, vocab_size=96, hidden_size=32, state_size=8,
        num_hidden_layers=2), attention=False, state_space=True),
    _lm("falcon-h1", "hybrid: attention + Mamba-2 mixers in parallel", _hf(
        tf.FalconH1ForCausalLM, tf.FalconH1Config, **_LM, intermediate_size=128, mamba_d_ssm=64, mamba_n_heads=4,
        mamba_d_head=16, mamba_d_state=8, mamba_chunk_size=4, num_logits_to_keep=0)),
    Arch("whisper", "transformers", "encoder-decoder, audio in, text out (decoder inputs)", _hf(
        tf.WhisperForConditionalGeneration, tf.WhisperConfig, **WHISPER), whisper_inputs, (2, 6), (3, 9),
        peft_task="SEQ_2_SEQ_LM"),
    Arch("clip", "transformers", "two towers: text + vision transformers, contrastive logits", _hf(
        tf.CLIPModel, tf.CLIPConfig, **CLIP_TOWERS), clip_inputs, (2, 8), (3, 11)),
]


# --- timm ---------------------------------------------------------------------------------------

def _timm(name: str, **kwargs: Any) -> Callable[[], nn.Module]:
    return lambda: timm.create_model(name, pretrained=False, **{"num_classes": 10, **kwargs})


def _random_head(model: nn.Module) -> nn.Module:
    """timm's Mixer starts its head at zero (fine-tuning practice): every output would be the bias and no
    adapter upstream could change it. Random, as after training."""
    with torch.no_grad():
        model.head.weight.normal_(0, model.head.in_features ** -0.5)
    return model


# A convolutional network has no linear sublayer added to a residual (bottleneck) and no linear op but its head,
# which "all-linear" leaves out (VeRA; its 1x1 convolutions are convolutions).
NO_BLOCKS = ("bottleneck", "vera")

TIMM = [
    Arch("timm-vit", "timm", "vision transformer", tiny_timm_vit, image, (2, 32), (3, 32)),
    Arch("timm-deit", "timm", "vision transformer, distillation token",
         _timm("deit_tiny_distilled_patch16_224", depth=2, img_size=32, num_classes=7), image, (2, 32), (3, 32)),
    Arch("timm-resnet18", "timm", "convolutional", _timm("resnet18"), image, (2, 32), (3, 48), attention=False,
         refuses=NO_BLOCKS + ("ln_tuning",)),  # batch norms only
    Arch("timm-convnext", "timm", "convolutional", _timm("convnext_atto", ls_init_value=0.5), image, (2, 32), (3, 64),
         attention=False, refuses=NO_BLOCKS),  # see LAYER_SCALE; convnext_atto's MLPs are 1x1 convs (conv_mlp)
    Arch("timm-mobilenetv3", "timm", "convolutional, depthwise + squeeze-excite", _timm("mobilenetv3_small_050"),
         image, (2, 32), (3, 48), attention=False, refuses=NO_BLOCKS + ("ln_tuning",)),  # batch norms only
    Arch("timm-regnet", "timm", "convolutional, grouped", _timm("regnetx_002"), image, (2, 32), (3, 48),
         attention=False, refuses=NO_BLOCKS + ("ln_tuning",)),  # batch norms only
    Arch("timm-swin", "timm", "hierarchical vision transformer, shifted windows", _timm(
        "swin_tiny_patch4_window7_224", img_size=32, window_size=4, embed_dim=16, depths=(1, 1), num_heads=(2, 2)),
        image, (2, 32), (3, 32), fixed_sequence=True),
    Arch("timm-pvt_v2", "timm", "hierarchical vision transformer, reduced-key attention", _timm(
        "pvt_v2_b0", depths=(1, 1, 1, 1)), image, (2, 32), (3, 32), fixed_sequence=True),
    Arch("timm-mobilevit", "timm", "hybrid: convolutions + transformer blocks", _timm("mobilevit_xxs"),
         image, (2, 64), (3, 64), fixed_sequence=True),
    Arch("timm-levit", "timm", "hybrid: convolutional stem + attention with learned biases", _timm(
        "levit_128s", img_size=64), image, (2, 64), (3, 64), fixed_sequence=True,
        refuses=("ln_tuning",)),  # batch norms only (each linear layer is followed by one)
    Arch("timm-mixer", "timm", "MLP-Mixer (no attention)", lambda: _random_head(timm.models.mlp_mixer.MlpMixer(
        num_classes=10, img_size=32, patch_size=8, num_blocks=2, embed_dim=32)), image, (2, 32), (3, 32),  # mixer_s16_224's class, small
        attention=False),
]


# --- torchaudio ---------------------------------------------------------------------------------

def _w2v(**overrides: Any) -> Callable[[], nn.Module]:
    return lambda: tiny_torchaudio_wav2vec2(**overrides)


TORCHAUDIO = [
    Arch("torchaudio-wav2vec2", "torchaudio", "audio encoder", _w2v(), waveform, (2, 1600), (3, 2400)),
    Arch("torchaudio-hubert", "torchaudio", "audio encoder (HuBERT-large layout: layer-norm extractor, pre-norm)",
         _w2v(extractor_mode="layer_norm", extractor_conv_bias=True, encoder_layer_norm_first=True, aux_num_out=VOCAB),
         waveform, (2, 1600), (3, 2400)),
    Arch("torchaudio-conformer", "torchaudio", "audio encoder, length mask", tiny_conformer, conformer_inputs,
         (2, 20), (3, 31)),
]


# --- custom modules written with functional ops (FunctionalConvNet, FunctionalSDPA: the shared zoo's) ----

class FunctionalTokens(nn.Module):
    """Token ids in; F.embedding, F.linear and attention written out as matmul / softmax / matmul,
    all on bare parameters (no submodule at all)."""

    def __init__(self, dim: int = 32, heads: int = 4, layers: int = 2) -> None:
        super().__init__()
        self.heads = heads
        self.table = nn.Parameter(torch.randn(VOCAB, dim) * 0.5)
        self.qkv = nn.ParameterList(nn.Parameter(torch.randn(3 * dim, dim) * dim ** -0.5) for _ in range(layers))
        self.proj = nn.ParameterList(nn.Parameter(torch.randn(dim, dim) * dim ** -0.5) for _ in range(layers))
        self.head = nn.Parameter(torch.randn(VOCAB, dim) * dim ** -0.5)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = F.embedding(input_ids, self.table)
        b, t, d = x.shape
        for qkv, proj in zip(self.qkv, self.proj):
            h = F.layer_norm(x, (d,))
            q, k, v = F.linear(h, qkv).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            scores = q @ k.transpose(-2, -1) / (d // self.heads) ** 0.5
            y = torch.softmax(scores, dim=-1) @ v
            x = x + F.linear(y.transpose(1, 2).reshape(b, t, d), proj)
        return F.linear(F.layer_norm(x, (d,)), self.head)


CUSTOM = [
    Arch("custom-conv", "custom", "F.conv2d / F.linear / @ on bare parameters (no attention)", FunctionalConvNet,
         image, (2, 12), (3, 17), attention=False, refuses=("ln_tuning", "bottleneck")),  # no norm, no residual
    Arch("custom-sdpa", "custom", "F.scaled_dot_product_attention transformer on features", FunctionalSDPA,
         lambda b, t: (torch.randn(b, t, 8),), (2, 10), (3, 13)),
    Arch("custom-tokens", "custom", "F.embedding + matmul/softmax attention on bare parameters", FunctionalTokens,
         lambda b, t: (torch.randint(0, VOCAB, (b, t)),), (2, 8), (3, 11),
         refuses=("ln_tuning",)),  # its F.layer_norm has no weight: nothing for LN tuning to train
]

ARCHS: dict[str, Arch] = {a.id: a for a in TRANSFORMERS + LLMS + TIMM + TORCHAUDIO + CUSTOM}
METHODS = ("lora", "prompt", "ptuning", "prefix", "ia3", "ln_tuning", "bottleneck", "adalora", "oft", "loha", "lokr",
           "vera")
