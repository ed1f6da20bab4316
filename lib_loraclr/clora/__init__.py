"""CLoRA: prompt bindings, attention maps, the contrastive core, settings and composition."""
