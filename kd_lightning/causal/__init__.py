"""Causal-LM distillation: token-level losses on response tokens, vocabulary checks, Speculative KD."""

from kd_lightning.causal.module import CausalLMDistillModule
from kd_lightning.causal.promptkd import PromptKDModule
from kd_lightning.causal.speculative import SpeculativeKDModule
from kd_lightning.causal.vocabulary import VocabularyMismatchError

__all__ = ["CausalLMDistillModule", "PromptKDModule", "SpeculativeKDModule", "VocabularyMismatchError"]
