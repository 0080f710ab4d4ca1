"""Tiny random HuggingFace MoE models, one per supported family, built from config objects (never the Hub).

Each is a few layers of width 32 with 4-8 experts: small enough to build in milliseconds, big enough to exercise
what makes the family special (Switch capacity drops in both stacks, DeepSeek dense first layers and group-limited
selection, Qwen2-MoE shared experts and MLP-only layers, GPT-OSS router and expert biases).
"""

from __future__ import annotations

import functools
import textwrap
from pathlib import Path

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerFast

VOCAB_SIZE = 320
PAD_ID, EOS_ID = 0, 1  # T5 convention: the decoder starts from the pad token
SPECIAL_TOKENS = ["<pad>", "</s>"]  # ids 0 and 1, in this order

# Shared by the decoder-only families. initializer_range is large so that router logits are well separated:
# the tests compare top-k choices exactly, and near-ties could flip on a last-bit difference between two matmuls.
_COMMON = dict(
    vocab_size=VOCAB_SIZE,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.2,
    pad_token_id=PAD_ID,
    eos_token_id=EOS_ID,
    bos_token_id=EOS_ID,
    tie_word_embeddings=False,
)
_DEEPSEEK = dict(
    _COMMON,
    num_hidden_layers=3,
    first_k_dense_replace=1,  # layer 0 is a dense MLP: it has no router and must not become a site
    intermediate_size=64,
    moe_intermediate_size=24,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_shared_experts=1,
    n_group=2,
    topk_group=1,
    kv_lora_rank=16,
    q_lora_rank=None,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=8,
    num_key_value_heads=4,
)


def _config(family: str):
    from transformers import (
        DeepseekV2Config,
        DeepseekV3Config,
        GptOssConfig,
        MixtralConfig,
        OlmoeConfig,
        Qwen2MoeConfig,
        Qwen3MoeConfig,
        SwitchTransformersConfig,
    )

    if family == "switch_transformers":
        return SwitchTransformersConfig(
            vocab_size=VOCAB_SIZE,
            d_model=32,
            d_kv=8,
            d_ff=64,
            num_heads=4,
            num_layers=2,
            num_decoder_layers=2,
            num_sparse_encoder_layers=2,  # sparse step 1: both encoder blocks are MoE
            num_sparse_decoder_layers=1,  # sparse step 2: decoder block 1 only
            num_experts=4,
            expert_capacity=4,  # 16 tokens a row over 4 experts: any imbalance overflows
            router_jitter_noise=0.0,
            dropout_rate=0.0,
            initializer_factor=4.0,  # well-separated router logits, as initializer_range below
            pad_token_id=PAD_ID,
            eos_token_id=EOS_ID,
            decoder_start_token_id=PAD_ID,
        )
    if family == "mixtral":
        return MixtralConfig(**_COMMON, num_hidden_layers=2, intermediate_size=48, num_local_experts=4)
    if family == "qwen2_moe":
        # Three layers with the middle one MLP-only, so the MoE layers (0 and 2) are not contiguous.
        return Qwen2MoeConfig(
            **_COMMON,
            num_hidden_layers=3,
            mlp_only_layers=[1],
            intermediate_size=64,
            moe_intermediate_size=24,
            shared_expert_intermediate_size=40,
            num_experts=6,
            num_experts_per_tok=2,
        )
    if family == "qwen3_moe":
        return Qwen3MoeConfig(
            **_COMMON,
            num_hidden_layers=2,
            head_dim=8,
            intermediate_size=64,
            moe_intermediate_size=24,
            num_experts=8,
            num_experts_per_tok=2,
            norm_topk_prob=True,
        )
    if family == "olmoe":
        return OlmoeConfig(**_COMMON, num_hidden_layers=2, intermediate_size=24, num_experts=8, num_experts_per_tok=2)
    if family == "deepseek_v2":
        return DeepseekV2Config(**_DEEPSEEK, topk_method="group_limited_greedy", routed_scaling_factor=1.5)
    if family == "deepseek_v3":
        return DeepseekV3Config(**_DEEPSEEK, norm_topk_prob=True, routed_scaling_factor=2.5)
    if family == "gpt_oss":
        return GptOssConfig(
            **_COMMON,
            num_hidden_layers=2,
            head_dim=8,
            intermediate_size=24,
            num_local_experts=4,
            num_experts_per_tok=2,
            sliding_window=8,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},  # the YaRN default warns at 128 positions
        )
    raise ValueError(f"unknown tiny family {family!r}; known: {', '.join(FAMILIES)}.")


FAMILIES: list[str] = [
    "switch_transformers",
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "olmoe",
    "deepseek_v2",
    "deepseek_v3",
    "gpt_oss",
]


def build_tiny(family: str, seed: int = 0) -> PreTrainedModel:
    """A tiny random ``family`` model for generation (CausalLM, or Seq2SeqLM for Switch), float32, eval mode."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    config = _config(family)
    torch.manual_seed(seed)
    auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
    model = auto.from_config(config, dtype=torch.float32)
    generator = torch.Generator().manual_seed(seed)
    for name, buffer in model.named_buffers():
        if name.endswith("e_score_correction_bias"):
            # DeepSeek-V3 selects on sigmoid(logits) + this bias: make it large enough to change some choices.
            buffer.copy_(0.2 * torch.randn(buffer.shape, generator=generator))
    return model.eval()


def _bpe_corpus() -> list[str]:
    """A few hundred lines of real Python source (the standard library is on every machine)."""
    lines = []
    for module in (textwrap, functools):
        lines += Path(module.__file__).read_text().splitlines()
    return [line for line in lines if line.strip()][:600]


@functools.lru_cache(maxsize=1)
def _tokenizer_json() -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_bpe_corpus(), trainer=trainer)
    return tokenizer.to_str()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE over Python source with <pad>=0 and </s>=1, right padding."""
    from tokenizers import Tokenizer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(_tokenizer_json()), pad_token="<pad>", eos_token="</s>"
    )
    tokenizer.padding_side = "right"
    assert tokenizer.pad_token_id == PAD_ID and tokenizer.eos_token_id == EOS_ID
    assert len(tokenizer) <= VOCAB_SIZE
    return tokenizer


def save_tiny(family: str, directory: str | Path, seed: int = 0) -> Path:
    """Write ``build_tiny(family, seed)`` and a matching tokenizer to ``directory``: loadable offline."""
    directory = Path(directory)
    build_tiny(family, seed).save_pretrained(directory)
    tiny_tokenizer().save_pretrained(directory)
    return directory
