"""Evaluating model folders at any vision-token count.

    heldout.py          held-out shards: answers, exact-match accuracy and loss per question type, the prefill timed
    adaptive.py         adaptive N at inference: the smallest N of a ladder whose answer is confident
    adaptive_study.py   its threshold calibrated on a validation split, measured against every fixed N and the oracle
    lmms_eval_model.py  TokenFLEX as an lmms-eval model (python -m lmms_eval --model tokenflex)
    lmms_eval_sweep.py  lmms-eval's tasks over model folders, tile counts and N, with the prefill timed
    lmms_eval_plugin.py the entry point through which lmms-eval finds the model
"""
