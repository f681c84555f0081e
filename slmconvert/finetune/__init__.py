"""LoRA/QLoRA distillation of the LLM into SLMs (paper step S5)."""
