"""Decoder models: the Llama family (Llama 2/3, Yi, Mistral, Qwen1.5/2) and Mixtral."""
from jaxsft.models.model_config import ModelConfig
from jaxsft.models.llama import Transformer

__all__ = ["ModelConfig", "Transformer"]
