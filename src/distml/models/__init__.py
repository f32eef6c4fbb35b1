"""Model zoo: plain ``nn.Module``s (mlp, cnn, resnet, gpt, bert) and their registry.

Importing this package registers the built-in models; see
:mod:`distml.models.registry` for how configs are validated.
"""

from distml.models.registry import (
    ModelSpec,
    build_model,
    get_model_spec,
    make_model_config,
    model_names,
    register_model,
)

__all__ = [
    "ModelSpec",
    "build_model",
    "get_model_spec",
    "make_model_config",
    "model_names",
    "register_model",
]

# Registers the built-in models; model files import only the registry, layers and errors.
from distml.models import bert, bert_qa, cnn, gpt, hf, mlp, resnet  # noqa: F401
