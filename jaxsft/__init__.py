"""jaxsft: supervised fine-tuning of LLMs with JAX."""
