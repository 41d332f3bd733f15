"""Config loading: typed, rejects what it does not know, validates shapes before any tensor."""
from pathlib import Path

import pytest
import yaml

from llmstack.cli import parse_cli
from llmstack.config import ConfigError, apply_overrides, from_dict, load_config
from llmstack.model import ModelConfig, list_presets, model_preset
from llmstack.train import PretrainConfig


def test_unknown_key_names_key_and_nearest(tmp_path):
    with pytest.raises(ConfigError, match=r"'model.n_layres'.*did you mean 'model.n_layers'"):
        load_config(PretrainConfig, overrides=["model.n_layres=3"])


def test_unknown_top_level_section():
    with pytest.raises(ConfigError, match=r"'trian'.*'train'"):
        load_config(PretrainConfig, overrides=["trian.lr=1"])


def test_wrong_type_names_key_and_expected_type():
    with pytest.raises(ConfigError, match=r"model.dim: expected int, got 'wide'"):
        load_config(PretrainConfig, overrides=["model.dim=wide"])
    with pytest.raises(ConfigError, match=r"model.norm: expected one of 'rmsnorm', 'layernorm'"):
        load_config(PretrainConfig, overrides=["model.norm=batchnorm"])
    with pytest.raises(ConfigError, match=r"train.compile: expected bool"):
        load_config(PretrainConfig, overrides=["train.compile=3"])


@pytest.mark.parametrize("overrides, message", [
    (["model.dim=64", "model.n_heads=3"], "does not divide"),
    (["model.n_heads=4", "model.n_kv_heads=3"], "not a multiple"),
    (["model.moe.n_experts=4", "model.moe.top_k=5"], "top_k=5 must be between 1 and model.moe.n_experts=4"),
    (["model.max_seq_len=128", "data.seq_len=256"], "above model.max_seq_len"),
    (["model.dropout=1.5"], "dropout"),
])
def test_inconsistent_shapes_rejected(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(PretrainConfig, overrides=overrides)


def test_yaml_file_presets_and_overrides(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"model": "tiny", "data": {"seq_len": 64}, "train": {"lr": "3e-4"}}))
    cfg = load_config(PretrainConfig, path, ["model.n_layers=3", "train.max_steps=7"])
    assert cfg.model.n_layers == 3 and cfg.model.dim == 64  # preset + override
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.max_steps == 7
    assert cfg.model.n_kv_heads == 2 and cfg.model.head_dim == 16  # derived in __post_init__


def test_preset_with_base_and_nested_override():
    data = apply_overrides({"model": {"preset": "mixtral-8x7b", "n_layers": 2}}, ["model.moe.top_k=1"])
    m = from_dict(ModelConfig, data["model"]).validate()
    assert (m.n_layers, m.moe.n_experts, m.moe.top_k, m.dim) == (2, 8, 1, 4096)


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="did you mean"):
        model_preset("llama-3.2-1")


def test_cli_print_config_and_errors(capsys):
    with pytest.raises(SystemExit) as e:
        parse_cli(PretrainConfig, ["model=tiny", "data.seq_len=64", "model.n_layers=3", "--print-config"])
    assert e.value.code == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["model"]["n_layers"] == 3 and printed["data"]["seq_len"] == 64
    with pytest.raises(SystemExit) as e:
        parse_cli(PretrainConfig, ["model.n_layres=3"])
    assert e.value.code == 2
    assert "model.n_layers" in capsys.readouterr().err


PRESET_FILES = sorted(p.stem for p in (Path(__file__).resolve().parent.parent / "configs" / "model").glob("*.yaml"))


def test_every_preset_file_is_listed():
    assert {"tiny", "quickstart", "gpt2-124m", "llama-3.2-1b"} <= set(PRESET_FILES)
    assert list_presets() == PRESET_FILES


@pytest.mark.parametrize("name", PRESET_FILES)
def test_preset_loads_and_validates(name):
    cfg = model_preset(name)
    assert cfg.n_layers >= 1 and cfg.vocab_size >= 1
