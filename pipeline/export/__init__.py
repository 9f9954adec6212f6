"""How trained weights leave a run.

    convert.py     a ZeRO checkpoint -> a model folder, verified
    model_card.py  the folder's README.md: what was trained, on what, how; its evaluation table
"""
