"""gptforge: train, compress and serve GPT-style language models on the hardware you have."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("gptforge")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0+unknown"

from gptforge.config import ModelConfig, RunConfig, TrainConfig, model_preset  # noqa: E402
from gptforge.errors import GptforgeError  # noqa: E402
from gptforge.settings import LOAD_DEVICE, LOAD_DTYPE  # noqa: E402


def load(path, device: str = LOAD_DEVICE, dtype: str = LOAD_DTYPE):
    """(model, tokenizer) of a checkpoint folder or run directory, ready for gptforge.generate.generate/stream.

    Imported lazily so that `import gptforge` stays free of torch.
    """
    from gptforge.generate import load as _load

    return _load(path, device=device, dtype=dtype)


__all__ = ["ModelConfig", "RunConfig", "TrainConfig", "model_preset", "GptforgeError", "load", "__version__"]
