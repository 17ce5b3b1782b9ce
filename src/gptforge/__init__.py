"""gptforge: train, compress and serve GPT-style language models on the hardware you have."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gptforge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from gptforge.config import ModelConfig, RunConfig, TrainConfig, model_preset  # noqa: E402
from gptforge.errors import GptforgeError  # noqa: E402

__all__ = ["ModelConfig", "RunConfig", "TrainConfig", "model_preset", "GptforgeError", "__version__"]
