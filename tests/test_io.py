import json

import pytest
import torch

import vitrim
from vitrim.errors import ModelFileError, UnknownModelError
from vitrim.io import CONFIG_FILE, WEIGHTS_FILE


def test_save_load_round_trip_is_exact(uneven_model, tmp_path):
    vitrim.save(uneven_model, tmp_path / "m")
    again = vitrim.load(tmp_path / "m")
    assert again.config == uneven_model.config
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        assert torch.equal(again(x), uneven_model(x))
    saved = json.loads((tmp_path / "m" / CONFIG_FILE).read_text())
    assert saved["format"] == "vitrim"
    assert [b["heads"] for b in saved["config"]["blocks"]] == [3, 1, 0, 2]
    assert not list((tmp_path / "m").glob("*.part"))


def test_missing_config_is_named(tmp_path):
    (tmp_path / "m").mkdir()
    with pytest.raises(ModelFileError, match=r"has no config\.json"):
        vitrim.load(tmp_path / "m")


def test_corrupt_weights_are_reported(uneven_model, tmp_path):
    vitrim.save(uneven_model, tmp_path / "m")
    (tmp_path / "m" / WEIGHTS_FILE).write_bytes(b"\x00garbage")
    with pytest.raises(ModelFileError, match=r"model\.safetensors is not a valid safetensors file"):
        vitrim.load(tmp_path / "m")


def test_truncated_weights_are_reported(uneven_model, tmp_path):
    vitrim.save(uneven_model, tmp_path / "m")
    path = tmp_path / "m" / WEIGHTS_FILE
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ModelFileError, match="not a valid safetensors file"):
        vitrim.load(tmp_path / "m")


def test_weights_that_do_not_match_the_config(uneven_model, tmp_path):
    vitrim.save(uneven_model, tmp_path / "m")
    path = tmp_path / "m" / CONFIG_FILE
    data = json.loads(path.read_text())
    data["config"]["blocks"][0]["mlp_dim"] = 41
    path.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match=r"shape mismatch blocks\.0\.mlp\.fc1\.weight"):
        vitrim.load(tmp_path / "m")


def test_invalid_config_json(uneven_model, tmp_path):
    vitrim.save(uneven_model, tmp_path / "m")
    (tmp_path / "m" / CONFIG_FILE).write_text("{not json")
    with pytest.raises(ModelFileError, match="not valid JSON"):
        vitrim.load(tmp_path / "m")
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps({"format": "vitrim", "config": {"pool": "max"}}))
    with pytest.raises(ModelFileError, match="config.json"):
        vitrim.load(tmp_path / "m")


def test_unknown_name_lists_presets():
    with pytest.raises(UnknownModelError, match="presets: .*fmnist-vit"):
        vitrim.load("no-such-model")


def test_preset_without_weights_points_to_create():
    with pytest.raises(UnknownModelError, match=r"vitrim\.create\('vit-tiny'\)"):
        vitrim.load("vit-tiny")
    assert vitrim.create("vit-tiny").config.depth == 12


def test_saved_files_get_ordinary_permissions(uneven_model, tmp_path):
    import os
    import stat

    umask = os.umask(0o022)
    try:
        vitrim.save(uneven_model, tmp_path / "m")
    finally:
        os.umask(umask)
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        assert stat.S_IMODE((tmp_path / "m" / name).stat().st_mode) == 0o644


def test_directory_that_is_no_known_format(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / CONFIG_FILE).write_text(json.dumps({"hidden_size": 8}))
    with pytest.raises(ModelFileError, match=r"neither a vitrim model config .* nor a Hugging Face one"):
        vitrim.load(tmp_path / "m")


def test_timm_specs_without_timm_say_how_to_install(monkeypatch):
    import sys

    from vitrim.errors import ConfigError

    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(ConfigError, match=r"timm:NAME needs timm: pip install 'vitrim\[timm\]'"):
        vitrim.load("timm:deit_small_patch16_224")


def test_pretrained_applies_to_timm_only(uneven_model, tmp_path):
    from vitrim.errors import ConfigError

    vitrim.save(uneven_model, tmp_path / "m")
    with pytest.raises(ConfigError, match="applies to timm:NAME models"):
        vitrim.load(tmp_path / "m", pretrained=True)
