"""The quality lab: a small world that a model really learns, to measure the methods on.

Not a product feature: nothing outside ``lib_loraclr.lab`` and ``lib_loraclr.commands.lab``
imports it. See docs/quality.md.
"""
