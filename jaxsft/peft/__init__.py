"""Parameter-efficient fine-tuning: LoRA/DoRA (``lora``), prompt, P- and prefix
tuning (``prompts``), bottleneck adapters, freeze tuning, and what each stage
method means for the model and its trainable parameters (``methods``)."""
