"""SD1.x outside the WebUI: model runtime, checkpoints, configs, tokenizer, samplers."""
