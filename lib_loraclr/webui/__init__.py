"""Adapters to A1111: host objects arrive as parameters; nothing here imports the WebUI."""
