import math

import pytest

from gptforge.demo import DEMO_PROMPT, run_demo


@pytest.mark.slow
def test_demo_runs_the_whole_flow_in_its_budget(tmp_path):
    """The demo on the full bundled corpus with a few seconds of training: every stage runs and reports."""
    lines = []
    r = run_demo(tmp_path, minutes=0.05, progress=False, say=lines.append)
    assert r.precision in ("fp32", "bf16") and r.probe_ms["chosen"] == r.precision
    assert r.steps >= 1 and r.tokens == r.steps * 16 * 256  # the 3-second budget may stop it early
    assert r.final_val_loss < r.first_val_loss and math.isfinite(r.final_val_loss)
    assert r.first_val_loss == pytest.approx(math.log(4096), abs=0.5)  # an untrained model is near uniform
    assert r.sample.startswith(DEMO_PROMPT) and len(r.sample) > len(DEMO_PROMPT)
    assert (r.checkpoint / "model.safetensors").is_file()
    assert any("38 plays" in line for line in lines)
    assert r.task["name"] == "shakespeare-next-line" and r.task["chance"] == 0.25
    assert 0 <= r.task["before"] <= 1 and 0 <= r.task["after"] <= 1
