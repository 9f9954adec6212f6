"""lmms-eval's entry point for the `tokenflex` model (pyproject.toml, group lmms_eval.models).

Kept apart from pipeline/eval/lmms_eval_model.py: importing that module builds lmms-eval's model
registry, which loads the entry points, so an entry point there would be read half-imported.
"""

from lmms_eval.models.registry_v2 import ModelManifest


def manifest() -> ModelManifest:
    return ModelManifest(model_id="tokenflex", simple_class_path="pipeline.eval.lmms_eval_model.TokenFlexLMMs")
