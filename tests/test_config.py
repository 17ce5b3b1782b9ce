import dataclasses
from pathlib import Path

import pytest

from gptforge.config import MODEL_PRESETS, RunConfig, build_run_config, load_yaml, model_preset, parse_overrides, run_config_from_dict
from gptforge.errors import GptforgeError

ROOT = Path(__file__).resolve().parents[1]


def test_unknown_preset_lists_valid_ones():
    with pytest.raises(GptforgeError) as e:
        model_preset("gpt3")
    for name in MODEL_PRESETS:
        assert name in str(e.value)


def test_overrides_are_typed():
    cfg = build_run_config(preset="tiny", overrides=["--train.lr", "3e-4", "--model.n_layer=4", "--model.bias", "false",
                                                     "--train.seq_len", "none", "--train.max_time", "2"])
    assert cfg.train.lr == 3e-4 and cfg.model.n_layer == 4 and cfg.model.bias is False
    assert cfg.train.seq_len is None and cfg.train.max_time == 2.0
    assert parse_overrides(["--train.max-steps", "5"]) == {"train": {"max_steps": "5"}}


@pytest.mark.parametrize("args, message", [
    (["--train.lrr", "1"], "unknown key train.'lrr' \\(did you mean 'lr'\\?\\)"),
    (["--train.max_steps", "ten"], "train.max_steps: expected an integer"),
    (["--model.norm", "batchnorm"], "model.norm: 'batchnorm' is not one of layernorm, rmsnorm"),
    (["--model.bias", "maybe"], "model.bias: expected true or false"),
    (["--optim.lr", "1"], "unknown key section 'optim'"),
    (["--train.lr"], "needs a value"),
    (["stray"], "unrecognized argument"),
])
def test_bad_overrides_name_the_key(args, message):
    with pytest.raises(GptforgeError, match=message):
        build_run_config(preset="tiny", overrides=args)


def test_derived_values_follow_overrides():
    cfg = build_run_config(preset="gpt2", overrides=["--model.d_model", "512", "--model.n_head", "8"])
    assert cfg.model.mlp_width == 2048 and cfg.model.head_dim == 64
    assert model_preset("llama-1b").kv_heads == 8
    assert dataclasses.replace(model_preset("tiny"), vocab_size=1000).padded_vocab_size == 1024


def test_yaml_layers(tmp_path):
    f = tmp_path / "run.yaml"
    f.write_text("model:\n  preset: tiny\n  n_layer: 3\ntrain:\n  lr: 0.01\ndata: some/dir\n")
    cfg = build_run_config(f, overrides=["--train.lr", "0.02"])
    assert cfg.model.n_layer == 3 and cfg.model.d_model == 64 and cfg.train.lr == 0.02 and cfg.data == "some/dir"
    # --model on the command line replaces the file's preset; the file's explicit fields still apply.
    cfg = build_run_config(f, preset="shakespeare")
    assert cfg.model.d_model == 256 and cfg.model.n_layer == 3
    # A saved config loads back to the same config.
    cfg.save(tmp_path / "saved.yaml")
    assert run_config_from_dict(load_yaml(tmp_path / "saved.yaml")) == cfg


def test_yaml_errors(tmp_path):
    f = tmp_path / "bad.yaml"
    f.write_text("train:\n  lr: [1, 2]\n")
    with pytest.raises(GptforgeError, match="train.lr: expected a number"):
        build_run_config(f)
    f.write_text("trian:\n  lr: 1\n")
    with pytest.raises(GptforgeError, match="did you mean 'train'"):
        build_run_config(f)
    f.write_text("train: [unclosed\n")
    with pytest.raises(GptforgeError, match="not valid YAML"):
        build_run_config(f)
    with pytest.raises(GptforgeError, match="config file not found"):
        build_run_config(tmp_path / "missing.yaml")


@pytest.mark.parametrize("path", sorted((ROOT / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_load(path):
    assert isinstance(build_run_config(path), RunConfig)
