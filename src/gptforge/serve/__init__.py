"""An OpenAI-compatible HTTP server over the inference engine: `gptforge serve CKPT`.

The official `openai` client, curl and tools built on them work unchanged against `/v1/completions`,
`/v1/chat/completions` and `/v1/models`. Decoding is the engine's (BatchEngine); this package adds what a
server needs around it, one layer per module, each importing only those before it:

- ServeConfig, the `gptforge serve` flags, lives in gptforge.settings (torch-free, so `--help` reads it).
- `metrics`: Prometheus counters and histograms at /metrics.
- `protocol`: OpenAI's shapes: the error JSON, bounded body parsing (size, nesting depth, string validity),
  request validation into engine jobs (OpenAI's defaults stated once: OPENAI_DEFAULTS), response and
  stream chunks.
- `scheduler`: the one thread that drives the engine (continuous batching, the bounded queue, cancellation,
  deadlines) and hands its tokens to the event loop.
- `app`: routes, auth, error handlers (every non-2xx is OpenAI's error JSON with a code, counted), and
  `serve`, which binds the socket and runs uvicorn with a SIGTERM drain.
"""

from gptforge.settings import ServeConfig

from .app import create_app, serve
from .metrics import Metrics
from .protocol import OPENAI_DEFAULTS, APIError, RequestParser, parse_body
from .scheduler import Scheduler

__all__ = ["OPENAI_DEFAULTS", "APIError", "Metrics", "RequestParser", "Scheduler", "ServeConfig", "create_app",
           "parse_body", "serve"]
