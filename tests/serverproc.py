"""A real `gptforge serve` in a subprocess, shared by the server tests (test_serve, test_eval_serve)."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

KEY = "test-key"


class Server:
    """`gptforge serve CKPT --port 0 ARGS` in a subprocess; the port is read from its first line."""

    def __init__(self, ckpt: Path, log: Path, *args: str):
        self.log = open(log, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "gptforge", "serve", str(ckpt), "--port", "0",
                                      "--threads", "1", *args], stdout=subprocess.PIPE, stderr=self.log, text=True)
        line = self.proc.stdout.readline()
        m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
        assert m, f"server did not start: {line!r} {log.read_text()}"
        self.url = m[1]
        for _ in range(200):
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.05)

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.url + "/v1", api_key=key or "none", max_retries=0, timeout=60)

    def post(self, path: str, body, key: str | None = KEY, timeout: float = 60) -> httpx.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        content = body if isinstance(body, (str, bytes)) else json.dumps(body)
        return httpx.post(self.url + path, content=content, headers=headers, timeout=timeout)

    def metric(self, name: str) -> float:
        text = httpx.get(self.url + "/metrics").text
        m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(m[1]) if m else 0.0

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=30)
        self.log.close()
        return code

    def complete(self, **body) -> httpx.Response:
        """POST /v1/completions for the model named `tiny` (no API key)."""
        return httpx.post(self.url + "/v1/completions", json={"model": "tiny", **body}, timeout=60)
