"""gptforge.loader, the one loading path: checkpoints whose config.yaml was written before the `compression` and
`finetune` sections were typed still load (quantized, pruned, LoRA, classifier), today's files write those sections
exactly as before, a bad section is one clear error naming the key, and devices and dtypes resolve in one place."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch
import yaml

from gptforge.compress.run import prune_checkpoint, quantize_checkpoint
from gptforge.checkpoint import read_config, write_checkpoint
from gptforge.config import CompressionConfig, FinetuneConfig, LoRAConfig, ModelConfig, RunConfig, TrainConfig
from gptforge.errors import GptforgeError
from gptforge.finetune.run import FinetuneSpec, finetune
from gptforge.hardware import resolve_device
from gptforge.loader import load_checkpoint, load_classifier
from gptforge.model import GPT
from gptforge.tokenizer import Tokenizer

TEXT = "the quick brown fox jumps over the lazy dog; good bad one two three "

# The sections as gptforge wrote them before they were typed (commit 218c5f9, the same commands as below).
OLD_SECTIONS = {
    "int4": {"compression": {"quantization": {"method": "int4", "group_size": 32, "packing": "group-halves"}}},
    "int8": {"compression": {"quantization": {"method": "int8"}}},
    "structured": {"compression": {"pruning": {"method": "structured", "sparsity": 0.5, "heads": "4->2",
                                               "mlp_channels": "256->128", "params": "124672->75072",
                                               "measured_sparsity": 0.5}}},
    "nm": {"compression": {"pruning": {"method": "magnitude", "sparsity": 0.5, "pattern": "2:4",
                                       "measured_sparsity": 0.5}}},
    "structured-int8": {"compression": {"pruning": {"method": "structured", "sparsity": 0.5, "heads": "4->2",
                                                    "mlp_channels": "256->128", "params": "124672->75072",
                                                    "measured_sparsity": 0.5},
                                        "quantization": {"method": "int8"}}},
    "lora-classify": {"finetune": {"method": "lora", "task": "classify", "labels": ["bad", "good"],
                                   "lora": {"rank": 4, "alpha": 16.0, "dropout": 0.0, "targets": ["qkv", "up"]},
                                   "base": "BASE"}},
    "full-classify": {"finetune": {"method": "full", "task": "classify", "labels": ["bad", "good"]}},
}


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """Checkpoints written by today's code with the commands that wrote OLD_SECTIONS."""
    out = tmp_path_factory.mktemp("made")
    tok = Tokenizer.train([TEXT * 40], 320)
    cfg = RunConfig(model=ModelConfig(n_layer=2, n_head=4, d_model=64, vocab_size=tok.vocab_size, block_size=64))
    torch.manual_seed(0)
    base = write_checkpoint(out / "base", cfg, tok, model_state=GPT(cfg.model).state_dict())
    ckpts = {"base": base}
    ckpts["int4"], _ = quantize_checkpoint(str(base), "int4", str(out / "int4"), 32)
    ckpts["int8"], _ = quantize_checkpoint(str(base), "int8", str(out / "int8"))
    ckpts["structured"], _, _ = prune_checkpoint(str(base), "structured", str(out / "structured"), 0.5, progress=False)
    ckpts["nm"], _, _ = prune_checkpoint(str(base), "magnitude", str(out / "nm"), pattern="2:4", progress=False)
    ckpts["structured-int8"], _ = quantize_checkpoint(str(ckpts["structured"]), "int8", str(out / "structured-int8"))
    rng = random.Random(0)
    with open(out / "cls.jsonl", "w") as f:
        for _ in range(40):
            lab = rng.choice(["good", "bad"])
            f.write(json.dumps({"text": f"{lab} {lab} one", "label": lab}) + "\n")
    tc = TrainConfig(max_steps=2, micro_batch=4, seq_len=64, warmup_steps=1, eval_every=2, save_every=2,
                     tensorboard=False, device="cpu", log_every=1)
    lora = LoRAConfig(rank=4, targets=("qkv", "up"))
    for name, spec in (("lora-classify", FinetuneSpec("lora", "classify", lora)), ("full-classify", FinetuneSpec("full", "classify"))):
        r = finetune(RunConfig(out=str(out / name), train=tc), base, spec, data=str(out / "cls.jsonl"), progress=False)
        ckpts[name] = r.train.checkpoint
    return ckpts


def old_section(name: str, ckpts) -> dict:
    raw = json.loads(json.dumps(OLD_SECTIONS[name]))
    if "finetune" in raw and "base" in raw["finetune"]:
        raw["finetune"]["base"] = str(ckpts["base"].resolve())
    return raw


@pytest.mark.parametrize("name", list(OLD_SECTIONS))
def test_sections_are_written_as_before(made, name):
    written = yaml.safe_load((made[name] / "config.yaml").read_text())
    key = next(iter(OLD_SECTIONS[name]))
    assert written[key] == old_section(name, made)[key]


@pytest.mark.parametrize("name", list(OLD_SECTIONS))
def test_checkpoints_with_config_files_written_before_load(made, tmp_path, name):
    """The checkpoint's config.yaml replaced by one whose section is the pre-typed text: same model, same logits."""
    old = tmp_path / name
    shutil.copytree(made[name], old)
    raw = yaml.safe_load((old / "config.yaml").read_text())
    (old / "config.yaml").write_text(yaml.safe_dump({**raw, **old_section(name, made)}, sort_keys=False))
    load = load_classifier if name.endswith("classify") else load_checkpoint
    new_model, _, new_cfg = load(made[name])
    old_model, _, old_cfg = load(old)
    assert (old_cfg.compression, old_cfg.finetune) == (new_cfg.compression, new_cfg.finetune)
    x = torch.randint(0, 300, (2, 16))
    torch.testing.assert_close(old_model(x), new_model(x), rtol=0, atol=0)


def test_typed_sections_read_what_the_commands_did(made):
    q = read_config(made["int4"]).compression
    assert isinstance(q, CompressionConfig) and q.quantized and q.pruning is None
    assert (q.quantization.method, q.quantization.group_size, q.quantization.packing) == ("int4", 32, "group-halves")
    both = read_config(made["structured-int8"]).compression
    assert both.pruning.heads == "4->2" and both.quantization.method == "int8"
    ft = read_config(made["lora-classify"]).finetune
    assert isinstance(ft, FinetuneConfig) and ft.lora.targets == ("qkv", "up") and ft.labels == ["bad", "good"]
    assert read_config(made["base"]).compression is None and read_config(made["base"]).finetune is None


@pytest.mark.parametrize("section, message", [
    ({"compression": {"quantization": {"mehtod": "int8"}}}, "unknown key compression.quantization.'mehtod'"),
    ({"compression": {"quantization": {"method": "int3"}}}, "compression.quantization.method: 'int3' is not one of"),
    ({"compression": {"pruning": {"method": "wanda"}}}, "compression.pruning: sparsity missing"),
    ({"compression": {"pruning": {"method": "wanda", "sparsity": "half"}}}, "compression.pruning.sparsity: expected a number"),
    ({"finetune": {"method": "lora", "task": "lm", "base": "b", "lora": {"rank": "x"}}}, "finetune.lora.rank: expected an integer"),
    ({"finetune": {"method": "full", "task": "classify", "labels": "good,bad"}}, "finetune.labels: expected a list"),
    ({"finetune": {"method": "lora", "task": "lm"}}, "method lora needs its lora settings and its base"),
    ({"compression": ["int8"]}, "compression: expected a mapping"),
])
def test_a_bad_section_is_one_error_naming_the_key(made, tmp_path, section, message):
    bad = tmp_path / "bad"
    shutil.copytree(made["base"], bad)
    raw = yaml.safe_load((bad / "config.yaml").read_text())
    (bad / "config.yaml").write_text(yaml.safe_dump({**raw, **section}, sort_keys=False))
    with pytest.raises(GptforgeError, match=str(bad / "config.yaml")) as e:
        load_checkpoint(bad)
    assert message in str(e.value)


def test_load_casts_to_a_dtype_and_refuses_an_unknown_one(made):
    model, _, _ = load_checkpoint(made["base"], dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    auto, _, _ = load_checkpoint(made["base"], device="cpu", dtype="auto")
    assert {p.dtype for p in auto.parameters()} == {torch.float32}  # auto is bf16 only on CUDA
    with pytest.raises(GptforgeError, match="unknown dtype 'float8'; use auto, float32, bfloat16, float16"):
        load_checkpoint(made["base"], dtype="float8")


def test_load_refuses_the_wrong_kind_of_checkpoint(made):
    with pytest.raises(GptforgeError, match="is a classifier, not a language model"):
        load_checkpoint(made["full-classify"])
    with pytest.raises(GptforgeError, match="is not a classifier"):
        load_classifier(made["int8"])


def test_one_device_function():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    assert resolve_device(None) == resolve_device("auto")
    with pytest.raises(GptforgeError, match="--device: unknown device 'tpu'"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(GptforgeError, match="--train.device is 'cuda' but no CUDA device is available; use --train.device cpu"):
            resolve_device("cuda", flag="--train.device")


@pytest.mark.parametrize("name", ["base", "int8", "int4"])
def test_mapped_weights_equal_the_safetensors_reader(made, name):
    """The loader maps each tensor's own bytes of model.safetensors: the same keys, dtypes, shapes and values as
    safetensors' own reader, and a loaded model computes exactly the logits of one loaded through it."""
    from safetensors.torch import load_file

    from gptforge.loader import _weights, build_model

    ref = load_file(made[name] / "model.safetensors")
    mapped = _weights(made[name], torch.device("cpu"))
    assert set(mapped) == set(ref)
    for key, t in ref.items():
        assert mapped[key].dtype == t.dtype and mapped[key].shape == t.shape and torch.equal(mapped[key], t), key
    model, _, cfg = load_checkpoint(made[name])
    old = build_model(cfg)
    old.load_state_dict(ref, assign=True)
    idx = torch.randint(0, cfg.model.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(idx), old.eval()(idx))


def test_a_cast_on_load_equals_casting_the_file(made):
    from safetensors.torch import load_file

    ref = {k: v.to(torch.bfloat16) for k, v in load_file(made["base"] / "model.safetensors").items()}
    model, _, _ = load_checkpoint(made["base"], dtype="bfloat16")
    assert all(torch.equal(t, ref[k]) for k, t in model.state_dict().items())


@pytest.mark.parametrize("keep", [1000, 5, -7])
def test_a_truncated_weights_file_is_one_clear_error(made, tmp_path, keep):
    bad = tmp_path / "bad"
    shutil.copytree(made["base"], bad)
    data = (made["base"] / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[:keep])
    with pytest.raises(GptforgeError, match=r"model\.safetensors: cannot read weights .*truncated"):
        load_checkpoint(bad)


def test_building_on_meta_runs_no_initialiser(made):
    """Initialising meta tensors is skipped: torch's normal_ on meta imports torch._dynamo, sympy and triton, about
    100 MB resident in every process that loads a model (checked in a fresh interpreter)."""
    import subprocess
    import sys

    code = ("import sys; from gptforge.loader import load_checkpoint; load_checkpoint(sys.argv[1]); "
            "print('torch._dynamo' in sys.modules, 'sympy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, str(made["int8"])], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_loading_and_decoding_import_no_build_chat_or_writer_libraries(made):
    """What only building the kernels (torch.utils.cpp_extension: setuptools, packaging), rendering a chat template
    (jinja2) or writing a checkpoint (safetensors) needs is imported when they run, not by a load and a decode: about
    7 MB resident of a gpt2 int8 decode's peak (docs/BENCHMARKS.md). Checked in a fresh interpreter, after the
    native library is built here (a build imports cpp_extension, rightly)."""
    import subprocess
    import sys

    from gptforge.native import available

    available()
    code = ("import sys, gptforge; from gptforge.generate import generate; m, t = gptforge.load(sys.argv[1]); "
            "generate(m, t, 'the quick', max_new_tokens=3); "
            "print(sorted(n for n in ('jinja2', 'setuptools', 'torch.utils.cpp_extension', 'safetensors', "
            "'gptforge.chat_template') if n in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code, str(made["int8"])], capture_output=True, text=True, check=True)
    assert out.stdout.split("\n")[-2] == "[]"


def test_a_chat_renders_after_a_plain_load(made):
    """The chat template's module, imported on first use, renders as before: the ChatML layout of a trained
    tokenizer with chat tokens."""
    tok = Tokenizer.load(made["base"])
    assert tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True) == \
        "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


def test_a_cast_leaves_quantized_scales_as_loaded(made):
    """load's dtype cast passes the quantized matrices' scales and minima by instead of casting copies it would
    throw away (which read every scale page of the mapped file): the cast function never sees them, only a
    0-element probe of their dtype for the device; they stay the loaded tensors, in their own dtype and order."""
    from gptforge.compress.quantize import QuantizedMatrix

    model, _, _ = load_checkpoint(made["int4"])
    mats = [m for m in model.modules() if isinstance(m, QuantizedMatrix)]
    before = [(m.scales.data_ptr(), m.zeros.data_ptr()) for m in mats]
    seen = []
    model._apply(lambda t: seen.append((t.dtype, t.numel())) or t.to(torch.bfloat16) if t.is_floating_point() else t)
    assert {n for dtype, n in seen if dtype == torch.float16} == {0}
    assert [(m.scales.data_ptr(), m.zeros.data_ptr()) for m in mats] == before
    assert {m.scales.dtype for m in mats} == {m.zeros.dtype for m in mats} == {torch.float16}
    assert list(mats[0].state_dict()) == ["weight_q", "scales", "zeros"]


def test_a_weight_dtype_gptforge_does_not_load_is_named(made, tmp_path):
    bad = tmp_path / "f8"
    shutil.copytree(made["base"], bad)
    data = (made["base"] / "model.safetensors").read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    key = next(k for k in header if k != "__metadata__")
    header[key]["dtype"] = "F8_E4M3"
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)  # offsets count from the data's start, wherever the header ends
    (bad / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
    with pytest.raises(GptforgeError, match=f"tensor {key} is F8_E4M3, which gptforge does not load"):
        load_checkpoint(bad)
