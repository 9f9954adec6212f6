"""DeepSpeed: what both the stages (stages/) and the training loop (pipeline/train/) build on.

    engine.py  the engine (ZeRO-3 or 2, AdamW, warmup-cosine), its config, its dtypes, where its tensors lie
    zero3.py   models built straight into ZeRO-3 partitions, from HF checkpoints or a model folder
"""
