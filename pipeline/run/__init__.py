"""What defines a training run and where it writes, as every command reads them.

    config.py  the typed run configuration: YAML plus dotted overrides, every key documented and checked
    layout.py  where a run keeps its checkpoints (written by training, read by conversion)
"""
