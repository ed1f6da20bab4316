"""A LoRA file and putting it on a model: reading, formats, metadata, key names, routing."""
