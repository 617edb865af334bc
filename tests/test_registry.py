"""The family registry: one module per family, looked up by live model, saved name or HF class."""

from __future__ import annotations

import json

import pytest
import torch

import vitrim
from vitrim.adapters import family, from_canonical, is_converted, metadata, require_family, to_canonical
from vitrim.adapters import registry
from vitrim.adapters.registry import (Family, check_metadata_keys, families, family_of, get_family, hf_family_for,
                                      register, spec_prefixes, supported_text)
from vitrim.errors import ConfigError, ModelFileError
from vitrim.models import uniform_config


def tiny():
    return vitrim.create(uniform_config(1, 16, 2, 2.0, image_size=8, patch_size=4, in_chans=1, num_classes=3,
                                        mean=(0.5,), std=(0.5,)), seed=0)


def test_the_built_in_families_are_registered_once_each():
    names = [f.name for f in families()]
    assert names[:3] == ["vitrim", "hf", "timm"] and len(names) == len(set(names))
    assert get_family("hf").hf_model_types == ("vit", "deit")
    assert spec_prefixes()["timm"] is get_family("timm")
    for f in families():
        assert f.summary in supported_text()


def test_unknown_family_names_list_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown model family 'nope' \(known: vitrim, hf, timm"):
        get_family("nope")


def test_a_family_registers_once():
    with pytest.raises(ConfigError, match="registered twice"):
        register(Family(name="vitrim", summary="x", recognizes=lambda m: False, to_canonical=lambda m: m,
                        from_canonical=lambda c, meta: c, metadata=lambda m: {}))


def test_vitrim_models_are_the_canonical_family():
    model = tiny()
    assert family_of(model) is get_family("vitrim") and require_family(model) == "vitrim"
    assert not is_converted(model) and to_canonical(model) is model
    assert metadata(model) == {"family": "vitrim"} and from_canonical(model, {"family": "vitrim"}) is model


def test_hf_classes_and_model_types_find_their_family():
    hf = get_family("hf")
    assert hf_family_for("vit", "ViTForImageClassification") is hf
    assert hf_family_for("deit") is hf
    assert hf_family_for("swin", "SwinModel") is None and hf_family_for("swin") is None
    assert hf_family_for("vit", "ViTForMaskedImageModeling") is None


def test_a_new_family_is_one_register_call():
    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    toy = Family(name="toy", summary="toy wrappers", recognizes=lambda m: isinstance(m, Wrapped),
                 to_canonical=lambda m: m.inner, from_canonical=lambda c, meta: Wrapped(c),
                 metadata=lambda m: {"toy": True}, prunable=("heads",))
    register(toy)
    try:
        model = Wrapped(tiny())
        assert family(model) is toy and is_converted(model) and to_canonical(model) is model.inner
        assert metadata(model) == {"family": "toy", "toy": True}
        assert isinstance(from_canonical(model.inner, metadata(model)), Wrapped)
        assert "toy wrappers" in supported_text()
    finally:
        registry._FAMILIES.pop("toy")


def test_metadata_keys_are_checked():
    keys = {"a": ((str,), True), "b": ((int, type(None)), False)}
    check_metadata_keys({"family": "x", "a": "s", "b": None}, keys)
    with pytest.raises(ModelFileError, match="names family 'x' but has no 'a'"):
        check_metadata_keys({"family": "x"}, keys)
    with pytest.raises(ModelFileError, match="'b' must be int or null, got True"):
        check_metadata_keys({"family": "x", "a": "s", "b": True}, keys)


def test_a_saved_model_naming_an_unknown_family_is_refused(tmp_path):
    vitrim.save(tiny(), tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    (tmp_path / "m" / "config.json").write_text(json.dumps({**config, "family": "nope"}))
    with pytest.raises(ModelFileError, match="unknown model family 'nope' .*vitrim, hf, timm.*iret"):
        vitrim.load(tmp_path / "m")


def _swin_dir(tmp_path):
    from safetensors.torch import save_file

    directory = tmp_path / "swin"
    directory.mkdir()
    (directory / "config.json").write_text(json.dumps({"architectures": ["SwinModel"], "model_type": "swin"}))
    save_file({"embeddings.norm.weight": torch.ones(4)}, str(directory / "model.safetensors"))
    return directory


def test_an_unsupported_hf_directory_is_one_line_naming_the_families(tmp_path, capsys):
    from vitrim.cli import main

    directory = _swin_dir(tmp_path)
    with pytest.raises(ConfigError, match=r"\(a Hugging Face SwinModel model\) is not a model vitrim knows; supported: "
                                          r"vitrim's VisionTransformer.*Hugging Face ViT/DeiT"):
        vitrim.load(directory)
    assert main(["bench", str(directory)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "supported: " in err and "SwinModel" in err


def test_a_live_unsupported_model_names_the_families():
    transformers = pytest.importorskip("transformers")
    swin = transformers.SwinModel(transformers.SwinConfig(image_size=8, patch_size=2, embed_dim=8, depths=[1],
                                                          num_heads=[1], window_size=2))
    with pytest.raises(ConfigError, match="SwinModel is not a model vitrim knows; supported: .*timm VisionTransformer"):
        require_family(swin)
    with pytest.raises(ConfigError, match="SwinModel is not a model vitrim knows"):
        vitrim.prune(swin, "flops=0.5", progress=False)


def test_one_resolver_gives_each_form(tmp_path):
    transformers = pytest.importorskip("transformers")
    from vitrim.adapters.native import NativeModel
    from vitrim.adapters.sources import load_model
    from vitrim.models import VisionTransformer

    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=8, patch_size=4, num_channels=1, num_labels=3)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "hf", safe_serialization=True)
    own = load_model(tmp_path / "hf")
    assert type(own.model).__name__ == "ViTForImageClassification" and own.weights == "trained"
    canonical = load_model(f"hf:{tmp_path / 'hf'}", form="canonical").model
    native = load_model(tmp_path / "hf", form="native").model
    assert isinstance(canonical, VisionTransformer) and isinstance(native, NativeModel)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(canonical(x), native(x), atol=1e-5, rtol=1e-5)
    random = load_model("vit-tiny", allow_random=True, form="native")
    assert random.weights == "random" and isinstance(random.model, VisionTransformer)
    with pytest.raises(ConfigError, match="form 'x' is not one of family, canonical, native"):
        load_model("vit-tiny", form="x")
