"""Tiny random models for tests: no files, deterministic for a seed, the real models'
architectures (Gemma 3, T5, GPT-2 with its Conv1D projections) at toy size."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from transformers import Gemma3ForCausalLM, Gemma3TextConfig, GPT2Config, GPT2LMHeadModel, PreTrainedModel, T5Config, T5ForConditionalGeneration

_BYTE_VOCAB = 384  # ByT5Tokenizer(): 3 specials + 256 bytes + 125 extra ids; pad 0, eos 1.
_TINY_IDS = {"vocab_size": _BYTE_VOCAB, "pad_token_id": 0, "eos_token_id": 1}


@contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed weight init without disturbing the caller's global RNG stream."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def _tiny_causal(seed: int) -> PreTrainedModel:
    """Gemma 3 architecture at toy size, so tests run the same code paths as the real model."""
    config = Gemma3TextConfig(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        query_pre_attn_scalar=16,
        intermediate_size=128,
        max_position_embeddings=512,
        sliding_window=128,
        bos_token_id=None,
        **_TINY_IDS,
    )
    with _seeded(seed):
        return Gemma3ForCausalLM(config)


def _tiny_seq2seq(seed: int) -> PreTrainedModel:
    config = T5Config(
        d_model=64,
        d_kv=16,
        d_ff=128,
        num_layers=2,
        num_decoder_layers=2,
        num_heads=4,
        decoder_start_token_id=0,
        **_TINY_IDS,
    )
    with _seeded(seed):
        return T5ForConditionalGeneration(config)


def _tiny_gpt2(seed: int) -> PreTrainedModel:
    """GPT-2 keeps its projections in transformers' Conv1D (weight stored transposed)."""
    config = GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=512, bos_token_id=1, **_TINY_IDS)
    with _seeded(seed):
        return GPT2LMHeadModel(config)


TINY = {"tiny": _tiny_causal, "tiny_seq2seq": _tiny_seq2seq, "tiny_gpt2": _tiny_gpt2}
