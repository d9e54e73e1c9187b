"""lightvlm: a LightLLM-style serving engine for vision-language models.

`from lightvlm import pipeline, GenerationConfig` gives the offline engine. The import is lazy so that
processes which need no torch (the httpserver) can import lightvlm's light modules cheaply.
"""

__version__ = "0.1.0"

_PIPELINE_NAMES = ("Pipeline", "GenerationConfig", "Response")


def __getattr__(name):
    if name == "pipeline" or name in _PIPELINE_NAMES:
        import importlib

        module = importlib.import_module("lightvlm.pipeline")  # a callable module: pipeline(model_dir)
        return module if name == "pipeline" else getattr(module, name)
    raise AttributeError(f"module 'lightvlm' has no attribute {name!r}")
