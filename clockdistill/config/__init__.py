"""Configuration: typed sections with visible defaults, presets, the methods table, and the one
function that layers every source of a run's settings (`layers.resolve_config`).

    sections.py   Config and its data / model / loss / train sections (dataclasses, validated)
    distill.py    the distill section (method, teacher, memory and logit knobs, DETRDistill parts)
    methods.py    what each distillation method needs (the capabilities table)
    presets.py    named detector presets (reference architectures and tiny CPU sizes)
    dotted.py     YAML parsing, dotted keys, typed construction, one-line range and choice checks
    layers.py     resolve_config: defaults < preset < starting checkpoint < file < variant < params < fixed

Importing this package or any of its modules pulls in no torch.
"""
