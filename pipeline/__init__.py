"""The TokenFLEX pipeline, by role. Each package's __init__.py maps its files.

    model/   the VLM and everything a model folder's remote code needs (flat, single-dot imports)
    data/    shards from published data; mixtures, epochs, the loader's stream, packed batches, resume
    run/     a training run's configuration and the layout of its checkpoints
    engine/  DeepSpeed: the engine, and models built straight into ZeRO-3 partitions
    export/  a ZeRO checkpoint -> a model folder with its model card
    train/   training one stage: python -m pipeline.train (stages/ says what each stage trains)
    eval/    held-out evaluation, adaptive N, the lmms-eval model and its sweeps
    launch.py  submitting a training run with submitit: python -m pipeline.launch

Lower layers never import higher ones: model < run < data, engine < stages/ < export < train < eval.
"""
