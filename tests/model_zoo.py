"""The tests' shared model zoo: the small models the tests build, each from one place.

Every builder makes a small model with random weights from a config (nothing is downloaded). The
defaults are the zoo's standard size (the one tests/test_models.py, tests/test_prompt_methods.py and the
conformance matrix run); a test that needs another size or option passes it as a keyword, which
replaces that field of the default config::

    tiny_gpt2()                                          # GPT2LMHeadModel, the standard config
    tiny_gpt2(n_positions=32, bos_token_id=0, seed=0)    # another config field; seeded first
    tiny_bert(model_class=BertModel)                     # the same config, another head

``seed`` (when given) seeds torch's generator just before the model is made, so the weights are fixed.
Builders return the model in training mode, as transformers makes it; callers call ``.eval()``.

The module is imported by name (``from model_zoo import tiny_gpt2``): tests/conftest.py puts tests/ on
``sys.path``. It is not called ``zoo``: tests/conformance/zoo.py (the registry of the conformance matrix's
architectures, which takes its shared builders from here) is imported by that name.
"""

from __future__ import annotations

import contextlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
import torch.nn.functional as F
import transformers
from torch import nn

VOCAB = 64
EXAMPLES = Path(__file__).resolve().parents[1] / "examples"

# --- the examples' models ------------------------------------------------------------------------

def load_example(name: str, module_name: str, register: bool = False) -> ModuleType:
    """examples/<name>.py (tiny_classifier, tiny_gpt2: a ``build_model()`` and its ``example_inputs()``),
    loaded the plain Python way under ``module_name``; ``register``: in ``sys.modules`` too (for pickling)."""
    spec = importlib.util.spec_from_file_location(module_name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    if register:
        sys.modules.setdefault(module_name, module)
    spec.loader.exec_module(module)
    return module


# --- inputs ---------------------------------------------------------------------------------------


def token_ids(batch: int, length: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, length))


def images(batch: int, size: int) -> torch.Tensor:
    return torch.randn(batch, 3, size, size)


# --- transformers ---------------------------------------------------------------------------------
# The default configs. Overriding a field: a keyword of the builder. A config dict is public where other
# architectures share it (the conformance zoo's RoBERTa takes BERT's, HuBERT takes wav2vec 2.0's).

GPT2 = dict(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)  # grouped-query attention
OPT = dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
           max_position_embeddings=64, word_embed_proj_dim=32)
BERT = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
            max_position_embeddings=64, num_labels=3)
T5 = dict(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4,
          decoder_start_token_id=0, pad_token_id=0)
VIT = dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=64, num_labels=5)
WAV2VEC2_CONV = dict(conv_dim=(16, 16, 16), conv_stride=(5, 4, 4), conv_kernel=(10, 4, 4))
WAV2VEC2 = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=4, **WAV2VEC2_CONV, vocab_size=VOCAB)


def _hf(model_class: Any, config_class: Any, defaults: dict, seed: int | None, overrides: dict) -> nn.Module:
    config = config_class(**{**defaults, **overrides})
    if seed is not None:
        torch.manual_seed(seed)
    return model_class(config)


def tiny_gpt2(model_class: Any = None, *, seed: int | None = None, **config: Any) -> nn.Module:
    import transformers as tf

    return _hf(model_class or tf.GPT2LMHeadModel, tf.GPT2Config, GPT2, seed, config)


def tiny_llama(model_class: Any = None, *, seed: int | None = None, **config: Any) -> nn.Module:
    import transformers as tf

    return _hf(model_class or tf.LlamaForCausalLM, tf.LlamaConfig, LLAMA, seed, config)


def tiny_opt(model_class: Any = None, *, seed: int | None = None, **config: Any) -> nn.Module:
    import transformers as tf

    return _hf(model_class or tf.OPTForCausalLM, tf.OPTConfig, OPT, seed, config)


def tiny_bert(model_class: Any = None, *, seed: int | None = None, **config: Any) -> nn.Module:
    import transformers as tf

    return _hf(model_class or tf.BertForSequenceClassification, tf.BertConfig, BERT, seed, config)


def tiny_t5(model_class: Any = None, *, seed: int | None = None, **config: Any) -> nn.Module:
    import transformers as tf

    return _hf(model_class or tf.T5ForConditionalGeneration, tf.T5Config, T5, seed, config)


def tiny_vit(model_class: Any = None, *, seed: int | None = None, **config: Any) -> nn.Module:
    """transformers' ViT (timm's: ``tiny_timm_vit``)."""
    import transformers as tf

    return _hf(model_class or tf.ViTForImageClassification, tf.ViTConfig, VIT, seed, config)


def tiny_wav2vec2(model_class: Any = None, *, seed: int | None = None, **config: Any) -> nn.Module:
    """transformers' wav2vec 2.0 with a CTC head (torchaudio's: ``tiny_torchaudio_wav2vec2``)."""
    import transformers as tf

    return _hf(model_class or tf.Wav2Vec2ForCTC, tf.Wav2Vec2Config, WAV2VEC2, seed, config)


def wav2vec2_frames(samples: int) -> int:
    """The number of frames ``tiny_wav2vec2``'s feature extractor makes of ``samples`` samples."""
    for kernel, stride in zip(WAV2VEC2_CONV["conv_kernel"], WAV2VEC2_CONV["conv_stride"]):
        samples = (samples - kernel) // stride + 1
    return samples


# --- timm -----------------------------------------------------------------------------------------

def tiny_timm_vit(*, seed: int | None = None, **options: Any) -> nn.Module:
    """timm's vit_tiny_patch16_224 cut to 2 blocks on 32-pixel images, random weights."""
    import timm

    options = {"depth": 2, "img_size": 32, "num_classes": 10, **options}
    if seed is not None:
        torch.manual_seed(seed)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, **options)


# --- torchaudio -----------------------------------------------------------------------------------

TORCHAUDIO_WAV2VEC2 = dict(
    extractor_mode="group_norm", extractor_conv_layer_config=[(16, 10, 5), (16, 4, 4), (16, 4, 4)],
    extractor_conv_bias=False, encoder_embed_dim=32, encoder_projection_dropout=0.1, encoder_pos_conv_kernel=16,
    encoder_pos_conv_groups=4, encoder_num_layers=2, encoder_num_heads=4, encoder_attention_dropout=0.1,
    encoder_ff_interm_features=64, encoder_ff_interm_dropout=0.0, encoder_dropout=0.1,
    encoder_layer_norm_first=False, encoder_layer_drop=0.0, aux_num_out=None,
)


def tiny_torchaudio_wav2vec2(**overrides: Any) -> nn.Module:
    """torchaudio's wav2vec 2.0 (wav2vec2_model), 2 layers of width 32 and a 3-conv feature extractor."""
    import torchaudio

    return torchaudio.models.wav2vec2_model(**{**TORCHAUDIO_WAV2VEC2, **overrides})


CONFORMER_DIM = 32


def tiny_conformer() -> nn.Module:
    import torchaudio

    return torchaudio.models.Conformer(input_dim=CONFORMER_DIM, num_heads=4, ffn_dim=64, num_layers=2,
                                       depthwise_conv_kernel_size=7, dropout=0.1)


def conformer_inputs(batch: int, frames: int) -> tuple:
    lengths = torch.full((batch,), frames, dtype=torch.int64)
    lengths[1:] = torch.randint(frames // 2, frames + 1, (batch - 1,))  # the first is full: max(lengths) == frames
    return (torch.randn(batch, frames, CONFORMER_DIM), lengths)


# --- custom modules written with functional ops ---------------------------------------------------

class EmbedConvNet(nn.Module):
    """An embedding, a 3x3 conv, a grouped conv and two linears, applied by module call:
    every LoRA kind (tests/test_peft_parity.py, tests/test_mixed_batch.py)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(20, 6)
        self.conv = nn.Conv2d(6, 8, 3, padding=1)
        self.gconv = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 4)

    def forward(self, ids):
        h = self.emb(ids).transpose(1, 2).reshape(ids.shape[0], 6, 3, 3)
        h = self.gconv(torch.relu(self.conv(h))).mean((2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


class FunctionalConvNet(nn.Module):
    """No nn.Linear / nn.Conv2d submodules: F.conv2d, F.linear and ``@`` on bare parameters."""

    def __init__(self, classes: int = 7) -> None:
        super().__init__()
        self.stem = nn.Parameter(torch.randn(16, 3, 3, 3) * 0.2)  # 3x3: a conv site, not linear-like
        self.pointwise = nn.Parameter(torch.randn(24, 16, 1, 1) * 0.25)  # 1x1: linear-like
        self.fc_weight = nn.Parameter(torch.randn(32, 24) * 0.2)
        self.fc_bias = nn.Parameter(torch.zeros(32))
        self.mix = nn.Parameter(torch.randn(32, 32) * 0.2)  # applied as h @ mix
        self.head = nn.Parameter(torch.randn(classes, 32) * 0.2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(F.conv2d(x, self.stem, padding=1))
        x = F.relu(F.conv2d(x, self.pointwise))
        h = F.gelu(F.linear(x.mean(dim=(2, 3)), self.fc_weight, self.fc_bias))
        return F.linear(torch.tanh(h @ self.mix), self.head)


class SDPABlock(nn.Module):
    """A causal F.scaled_dot_product_attention block with a residual."""

    def __init__(self, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.heads = heads
        self.norm = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return x + self.out(y.transpose(1, 2).reshape(b, t, d))


class FunctionalSDPA(nn.Module):
    """A user's own transformer written with F.scaled_dot_product_attention: features [b, t, 8] in, [b, t, 5] out."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 32)
        self.blocks = nn.Sequential(SDPABlock(), SDPABlock())
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.blocks(self.embed(x)))

# --- causal LMs for generation ----------------------------------------------------------------------
# The families users fine-tune, each 2 layers / hidden 64 / vocab 96 (tests/test_generate_*.py).

_CAUSAL_COMMON = dict(vocab_size=96, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128)
_GQA = dict(num_key_value_heads=2, **_CAUSAL_COMMON)


def _causal(model_class: str, config_class: str, **config: Any):
    """A builder of ``transformers.<model_class>`` from ``transformers.<config_class>(**config)``."""
    return lambda: getattr(transformers, model_class)(getattr(transformers, config_class)(**config))


CAUSAL_LMS = {
    "gpt2": _causal("GPT2LMHeadModel", "GPT2Config", n_layer=2, n_embd=64, n_head=4, vocab_size=96,
                    tie_word_embeddings=False),
    "llama": _causal("LlamaForCausalLM", "LlamaConfig", **_GQA),
    "mistral": _causal("MistralForCausalLM", "MistralConfig", sliding_window=64, **_GQA),
    "mistral-short-window": _causal("MistralForCausalLM", "MistralConfig", sliding_window=8, **_GQA),
    "falcon": _causal("FalconForCausalLM", "FalconConfig", vocab_size=96, hidden_size=64, num_hidden_layers=2,
                      num_attention_heads=4, new_decoder_architecture=True, num_kv_heads=2),
    "falcon-old": _causal("FalconForCausalLM", "FalconConfig", vocab_size=96, hidden_size=64, num_hidden_layers=2,
                          num_attention_heads=4, multi_query=True, parallel_attn=True, new_decoder_architecture=False),
    "mpt": _causal("MptForCausalLM", "MptConfig", vocab_size=96, d_model=64, n_layers=2, n_heads=4, expansion_ratio=2),
    "gpt-neox": _causal("GPTNeoXForCausalLM", "GPTNeoXConfig", **_CAUSAL_COMMON),
    "gemma2": _causal("Gemma2ForCausalLM", "Gemma2Config", head_dim=16, **_GQA),
    "phi3": _causal("Phi3ForCausalLM", "Phi3Config", pad_token_id=0, **_GQA),
    "qwen3": _causal("Qwen3ForCausalLM", "Qwen3Config", head_dim=16, **_GQA),
    "mixtral": _causal("MixtralForCausalLM", "MixtralConfig", num_local_experts=4, num_experts_per_tok=2, **_GQA),
}


@contextlib.contextmanager
def step_lengths(am):
    """The sequence length of every call ``generate`` makes to the adapted model ``am``: one token a
    step after the first when the key/value cache is kept."""
    lengths = []
    forward = am.forward

    def recording(*args, **kwargs):
        lengths.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    am.forward = recording
    try:
        yield lengths
    finally:
        del am.forward
