"""Bad model and data inputs: one clear vitrim error, raised before any large allocation or pickle load."""

import gzip
import json
import os
import re
import types

import pytest
import torch

import vitrim
from tests.test_data import write_idx_dir
from vitrim import limits
from vitrim.bench.accuracy import evaluate
from vitrim.data import ImageSet, load_dataset, load_idx_dir
from vitrim.data.fashion_mnist import idx_payload
from vitrim.errors import ConfigError, DataError, ModelFileError
from vitrim.models import PRESETS, ViTConfig, VisionTransformer, uniform_config

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def micro_config(**overrides) -> ViTConfig:
    kw = dict(image_size=8, patch_size=4, in_chans=1, num_classes=3, mean=(0.5,), std=(0.5,))
    kw.update(overrides)
    return uniform_config(1, 16, 2, 2.0, **kw)


def config_dict(**changes) -> dict:
    data = micro_config().to_dict()
    data.update(changes)
    return data


# ---------------------------------------------------------------- config.json types


@pytest.mark.parametrize("key, value, expected", [
    ("embed_dim", "16", "an integer"),
    ("embed_dim", 2.5, "an integer"),
    ("embed_dim", 16.0, "an integer"),
    ("embed_dim", True, "an integer"),
    ("num_classes", None, "an integer"),
    ("image_size", [8], "an integer"),
    ("class_token", 1, "true or false"),
    ("pool", 3, "a string"),
    ("mean", "0.5", "a list of numbers"),
    ("mean", ["0.5"], "a list of numbers"),
    ("std", [True], "a list of numbers"),
    ("norm_eps", "1e-6", "a number"),
    ("layer_scale_init", "small", "a number or null"),
    ("class_names", [1, 2, 3], "a list of strings or null"),
])
def test_wrong_type_names_key_value_and_type(key, value, expected):
    with pytest.raises(ConfigError) as info:
        ViTConfig.from_dict(config_dict(**{key: value}))
    message = str(info.value)
    assert f"'{key}'" in message and expected in message and json.dumps(value) in message


def test_wrong_type_messages_say_how_to_write_it():
    with pytest.raises(ConfigError, match=r'got "16" \(a string\); write it as a JSON number without quotes: 16'):
        ViTConfig.from_dict(config_dict(embed_dim="16"))
    with pytest.raises(ConfigError, match=r"got 16.0 \(a float\); write it without a fraction: 16"):
        ViTConfig.from_dict(config_dict(embed_dim=16.0))


@pytest.mark.parametrize("block, expected", [
    ({"heads": "2", "qk_dim": 8, "v_dim": 8, "mlp_dim": 32}, "'blocks[0].heads' must be an integer"),
    ({"heads": 2, "qk_dim": 8, "v_dim": 8, "mlp_dim": 32, "attention": "yes"}, "'blocks[0].attention' must be true"),
    ({"heads": 2, "qk_dim": 8, "v_dim": 8}, "'blocks[0]' lacks mlp_dim"),
    ({"heads": 2, "qk_dim": 8, "v_dim": 8, "mlp_dim": 32, "width": 3}, "'blocks[0]' has unknown keys width"),
    ({"heads": 2, "qk_dim": 8, "v_dim": 8, "mlp_dim": -1, "mlp": False}, "'blocks[0].mlp_dim' must not be negative"),
    ([2, 8, 8, 32], "'blocks[0]' must be an object"),
])
def test_bad_blocks_are_named(block, expected):
    with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        ViTConfig.from_dict(config_dict(blocks=[block]))


def test_every_config_key_has_a_checked_type():
    import dataclasses

    from vitrim.models.config import BLOCK_TYPES, CONFIG_TYPES, BlockDims

    assert set(CONFIG_TYPES) == {f.name for f in dataclasses.fields(ViTConfig)}
    assert set(BLOCK_TYPES) == {f.name for f in dataclasses.fields(BlockDims)}


def test_blocks_must_be_a_list():
    with pytest.raises(ConfigError, match="'blocks' must be a list of block objects, got an object"):
        ViTConfig.from_dict(config_dict(blocks={"heads": 2}))


def test_bad_model_directory_config_is_a_model_file_error(tmp_path):
    vitrim.save(vitrim.create(micro_config(), seed=0), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    data = json.loads(path.read_text())
    data["config"]["embed_dim"] = "16"
    path.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match=r"config\.json: config key 'embed_dim' must be an integer, got \"16\""):
        vitrim.load(tmp_path / "m")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_round_trip_and_are_counted_exactly(name):
    config = PRESETS[name].build()
    assert ViTConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    if config.embed_dim <= 192:
        assert limits.parameter_count(config) == sum(p.numel() for p in VisionTransformer(config).parameters())


def test_uneven_config_is_counted_exactly():
    from tests.conftest import uneven_config

    for config in (uneven_config(), uneven_config(qk_norm=True, layer_scale_init=0.1, qkv_bias=False, reg_tokens=2,
                                                  distill_token=True, distill_head=True, pos_embed_prefix=False)):
        assert ViTConfig.from_dict(config.to_dict()) == config
        assert limits.parameter_count(config) == sum(p.numel() for p in VisionTransformer(config).parameters())


def test_bundled_model_still_loads_and_evaluates():
    model = vitrim.load("fmnist-vit")
    data = ImageSet(torch.zeros(4, 1, 28, 28, dtype=torch.uint8), torch.arange(4),
                    list(model.config.class_names), model.config.mean, model.config.std)
    assert evaluate(model, data)["count"] == 4


# ---------------------------------------------------------------- family metadata


@pytest.mark.parametrize("family, drop, missing", [("hf", "hf_class", "hf_class"), ("hf", "hf_config", "hf_config"),
                                                   ("timm", None, "timm_class")])
def test_family_without_its_metadata_is_refused(tmp_path, family, drop, missing):
    vitrim.save(vitrim.create(micro_config(), seed=0), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    data = json.loads(path.read_text())
    data.update(family=family, hf_class="ViTForImageClassification", hf_config={"model_type": "vit"})
    data.pop(drop, None)
    path.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match=f"names family '{family}' but has no '{missing}'.*vitrim.save"):
        vitrim.load(tmp_path / "m")


def test_family_metadata_of_the_wrong_type_is_refused(tmp_path):
    vitrim.save(vitrim.create(micro_config(), seed=0), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    data = json.loads(path.read_text())
    data.update(family="timm", timm_class="VisionTransformer", timm_global_pool="token", timm_num_classes="3")
    path.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match="'timm_num_classes' must be int or null, got '3'"):
        vitrim.load(tmp_path / "m")
    data["timm_num_classes"] = 1000
    path.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match="'timm_num_classes' is 1000 but the model has 3 classes"):
        vitrim.load(tmp_path / "m")


# ---------------------------------------------------------------- memory bounds


@pytest.mark.parametrize("changes, key", [
    ({"embed_dim": 10**9}, "embed_dim=1000000000"),
    ({"num_classes": 10**9}, "num_classes=1000000000"),
    ({"image_size": 4 * 2**12, "patch_size": 4}, "image_size=16384 with patch_size=4"),
    ({"blocks": [{"heads": 2, "qk_dim": 8, "v_dim": 8, "mlp_dim": 32}] * (limits.MAX_DEPTH + 1)}, "blocks has 4097"),
    ({"blocks": [{"heads": 2, "qk_dim": 8, "v_dim": 8, "mlp_dim": 10**8}]}, "mlp_dim=100000000"),
    ({"blocks": [{"heads": 10**7, "qk_dim": 8, "v_dim": 8, "mlp_dim": 32}]}, "heads=10000000"),
])
def test_values_beyond_any_model_are_refused_by_name(changes, key):
    with pytest.raises(ConfigError, match=key):
        ViTConfig.from_dict(config_dict(**changes))


def test_model_larger_than_ram_is_refused_naming_key_and_ram(monkeypatch):
    monkeypatch.setattr(limits, "physical_ram", lambda: 1 << 30)
    huge_mlp = [{"heads": 2, "qk_dim": 8, "v_dim": 8, "mlp_dim": 2**20}] * 200
    with pytest.raises(ConfigError, match=r"needs about 7\.1 GB .* more than this machine's 1\.0 GB of RAM; the "
                                          r"largest part comes from mlp_dim=1048576; reduce it"):
        ViTConfig.from_dict(config_dict(embed_dim=4, blocks=huge_mlp))
    with pytest.raises(ConfigError, match=r"largest part comes from num_classes=1000000"):
        ViTConfig.from_dict(config_dict(embed_dim=512, num_classes=10**6))
    with pytest.raises(ConfigError, match=r"largest part comes from image_size=2048 \(patch_size=8, 65537 tokens\)"):
        ViTConfig.from_dict(config_dict(image_size=2048, patch_size=8))
    ViTConfig.from_dict(config_dict())  # small models still load


def test_huge_model_directory_fails_before_allocating(tmp_path):
    vitrim.save(vitrim.create(micro_config(), seed=0), tmp_path / "m")
    path = tmp_path / "m" / "config.json"
    data = json.loads(path.read_text())
    data["config"]["blocks"] = [dict(b, mlp_dim=2**20) for b in data["config"]["blocks"]] * 4000
    data["config"]["embed_dim"] = 2**16
    path.write_text(json.dumps(data))
    with pytest.raises(ModelFileError, match=r"config\.json: the model needs about .* PB .* of RAM; the largest part comes from mlp_dim"):
        vitrim.load(tmp_path / "m")


def test_batch_memory():
    config = PRESETS["fmnist-vit"].build()
    limits.check_batch_memory(config, 256, "--batch 256")
    with pytest.raises(ConfigError, match=r"^--batch 100000000: 100000000 images need about .* more than this "
                                          r"machine's .* of RAM; use a batch of at most \d+$"):
        limits.check_batch_memory(config, 100_000_000, "--batch 100000000")
    for bad in (0, -3, True, 2.0):
        with pytest.raises(ConfigError, match="--batch: a batch size must be a positive integer"):
            limits.check_batch_memory(config, bad, "--batch")


def test_batch_memory_suggests_a_batch_that_fits(monkeypatch):
    config = PRESETS["fmnist-vit"].build()
    monkeypatch.setattr(limits, "physical_ram", lambda: 64 << 20)
    with pytest.raises(ConfigError, match=r"at most (\d+)") as info:
        limits.check_batch_memory(config, 10_000, "--batch 10000")
    fits = int(re.search(r"at most (\d+)", str(info.value)).group(1))
    limits.check_batch_memory(config, fits, "--batch")
    with pytest.raises(ConfigError):
        limits.check_batch_memory(config, fits + 1, "--batch")
    monkeypatch.setattr(limits, "physical_ram", lambda: 1 << 20)
    with pytest.raises(ConfigError, match="even one image does not fit; use a smaller model"):
        limits.check_batch_memory(config, 1, "--batch 1")


def test_batch_memory_of_an_onnx_preprocessing_record():
    record = types.SimpleNamespace(image_size=28, in_chans=1)
    limits.check_batch_memory(record, 64, "--batch 64")
    with pytest.raises(ConfigError, match="--batch 10000000000000"):
        limits.check_batch_memory(record, 10**13, "--batch 10000000000000")


def test_physical_ram_and_its_fallback(monkeypatch):
    ram = limits.physical_ram()
    assert isinstance(ram, int) and ram > 1 << 20

    def unavailable(name):
        raise ValueError(name)

    monkeypatch.setattr(os, "sysconf", unavailable)
    assert limits.physical_ram() == (limits._meminfo_total() or limits.FALLBACK_RAM)
    monkeypatch.setattr(limits, "_meminfo_total", lambda: None)
    assert limits.physical_ram() == limits.FALLBACK_RAM


# ---------------------------------------------------------------- data


def test_idx_with_zero_images(tmp_path):
    write_idx_dir(tmp_path / "d", n_test=0)
    with pytest.raises(DataError, match="the test split holds zero images.*need at least one image"):
        load_dataset(f"idx:{tmp_path / 'd'}", "test")


@pytest.mark.parametrize("gz", [False, True])
def test_idx_header_claiming_more_than_ram(tmp_path, gz):
    write_idx_dir(tmp_path / "d")
    header = bytes([0, 0, 0x08, 3]) + b"".join(d.to_bytes(4, "big") for d in (2**31, 2**16, 2**16))
    stem = "t10k-images-idx3-ubyte"
    (tmp_path / "d" / stem).unlink()
    target = tmp_path / "d" / (stem + (".gz" if gz else ""))
    target.write_bytes(gzip.compress(header + bytes(100)) if gz else header + bytes(100))
    with pytest.raises(DataError, match=r"its header claims shape \(2147483648, 65536, 65536\) .* more than this "
                                        r"machine's .* of RAM"):
        load_dataset(f"idx:{tmp_path / 'd'}", "test")


def _replace_idx(directory, stem, tensor_bytes):
    (directory / stem).write_bytes(tensor_bytes)


def test_idx_labels_stored_as_floats_or_negative(tmp_path):
    d = write_idx_dir(tmp_path / "d")
    floats = bytes([0, 0, 0x0D, 1]) + (6).to_bytes(4, "big") + torch.ones(6).numpy().astype(">f4").tobytes()
    _replace_idx(d, "t10k-labels-idx1-ubyte", floats)
    with pytest.raises(DataError, match="labels are stored as torch.float32; labels are integer class indices"):
        load_dataset(f"idx:{d}", "test")
    negative = bytes([0, 0, 0x09, 1]) + (6).to_bytes(4, "big") + bytes([0, 1, 255, 0, 1, 2])
    _replace_idx(d, "t10k-labels-idx1-ubyte", negative)
    with pytest.raises(DataError, match="has label -1; labels are class indices"):
        load_dataset(f"idx:{d}", "test")


def test_idx_images_not_square(tmp_path):
    d = write_idx_dir(tmp_path / "d")
    _replace_idx(d, "t10k-images-idx3-ubyte", idx_payload(torch.zeros(6, 8, 5, dtype=torch.uint8)))
    with pytest.raises(DataError, match="test images are 8x5; vitrim needs square images"):
        load_dataset(f"idx:{d}", "test")


def test_idx_labels_beyond_named_classes(tmp_path):
    d = write_idx_dir(tmp_path / "d")  # labels 0..2
    with pytest.raises(DataError, match="labels go up to 2 but the data set has 2 classes"):
        load_idx_dir(d, "test", name="two", class_names=["a", "b"])


def test_imageset_refuses_float_and_negative_labels():
    images = torch.zeros(3, 1, 4, 4, dtype=torch.uint8)
    with pytest.raises(DataError, match="labels must be integers"):
        ImageSet(images, torch.zeros(3), ["a"], (0.5,), (0.5,))
    with pytest.raises(DataError, match="label -2 is negative"):
        ImageSet(images, torch.tensor([0, -2, 1]), ["a", "b"], (0.5,), (0.5,))


def ten_class_set(n=8, size=8):
    return ImageSet(torch.zeros(n, 1, size, size, dtype=torch.uint8), torch.arange(n) % 10,
                    [str(i) for i in range(10)], (0.5,), (0.5,), name="ten")


def test_evaluate_refuses_labels_beyond_the_model_before_running_it():
    model = VisionTransformer(micro_config())  # 3 classes
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    with pytest.raises(DataError, match=r"ten has labels up to 7 but the model \(VisionTransformer\) has 3 "
                                        r"outputs \(classes 0..2\)"):
        evaluate(model, ten_class_set())
    assert calls == []


def test_evaluate_refuses_a_class_count_mismatch():
    data = ImageSet(torch.zeros(4, 1, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 0, 1]), list("abcdefghij"),
                    (0.5,), (0.5,), name="ten")
    with pytest.raises(DataError, match="ten has 10 classes but the model .* has 3 outputs"):
        evaluate(VisionTransformer(micro_config()), data)


def test_evaluate_accepts_inferred_classes_below_the_model(tmp_path):
    d = write_idx_dir(tmp_path / "d")  # labels 0..2, class names inferred
    data = load_dataset(f"idx:{d}", "test")
    assert data.inferred_classes and len(data.class_names) == 3
    assert evaluate(VisionTransformer(micro_config(num_classes=5)), data)["count"] == 6


def test_evaluate_checks_undeclared_outputs_on_the_first_batch():
    class Wide(torch.nn.Module):
        def forward(self, x):
            return x.flatten(1)  # 64 "logits"

    with pytest.raises(DataError, match=r"ten has 10 classes but the model \(Wide\) has 64 outputs"):
        evaluate(Wide(), ten_class_set())
    with pytest.raises(DataError, match=r"returns outputs of shape \(8, 1, 8, 8\) for 8 images"):
        evaluate(torch.nn.Identity(), ten_class_set())


def flatten_onnx(path, width_dim):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Flatten", ["pixels"], ["logits"], axis=1)], "flatten",
        [helper.make_tensor_value_info("pixels", TensorProto.FLOAT, ["batch", 1, 28, 28])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", width_dim])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return path


def test_onnx_output_width_must_match_the_classes(tmp_path):
    pytest.importorskip("onnxruntime")
    from vitrim.quant import OnnxModel, Preprocessing

    model = OnnxModel(flatten_onnx(tmp_path / "flat.onnx", 784), threads=1,
                      preprocessing=Preprocessing(28, 1, (0.5,), (0.5,)))
    assert model.num_outputs == 784
    calls = []
    model._session.run = lambda *a, **k: calls.append(1)
    with pytest.raises(DataError, match=r"ten has 10 classes but the model .*flat\.onnx has 784 outputs; evaluate "
                                        r"it on data with 784 classes, or use a model trained for these 10"):
        evaluate(model, ten_class_set(size=28))
    assert calls == []  # refused before running


def _png(path, size):
    from PIL import Image

    Image.new("L", (size, size), 128).save(path)


@pytest.mark.parametrize("size", [15, 20])  # over the limit (a warning in PIL), over twice the limit (an error)
def test_image_claiming_a_huge_size_is_a_data_error(tmp_path, monkeypatch, size):
    from PIL import Image

    (tmp_path / "cat").mkdir()
    _png(tmp_path / "cat" / "ok.png", 8)
    _png(tmp_path / "cat" / "bomb.png", size)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(DataError, match=r"image .*bomb\.png claims a size beyond the safe limit of 100 pixels.*"
                                        r"resize it or remove it from the folder"):
        load_dataset(f"folder:{tmp_path}", image_size=8, channels=1)


def test_undecodable_image_is_a_data_error(tmp_path):
    (tmp_path / "cat").mkdir()
    (tmp_path / "cat" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    with pytest.raises(DataError, match=r"cannot decode image .*broken\.png.*replace or remove the file"):
        load_dataset(f"folder:{tmp_path}", image_size=8, channels=1)


def test_image_folder_larger_than_ram(tmp_path, monkeypatch):
    from vitrim.data import load_image_folder
    from vitrim.data.loader import FolderSet

    (tmp_path / "cat").mkdir()
    _png(tmp_path / "cat" / "a.png", 8)
    monkeypatch.setattr(limits, "physical_ram", lambda: 1000)
    with pytest.raises(DataError, match=r"1 images at 64x64 need 16\.0 KB, more than this machine's 1000 B of RAM"):
        load_image_folder(tmp_path, 64, channels=1)
    lazy = load_dataset(f"folder:{tmp_path}", image_size=64, channels=1)  # too large to hold: read lazily
    assert isinstance(lazy, FolderSet) and len(lazy) == 1 and next(lazy.batches(1))[0].shape == (1, 1, 64, 64)


# ---------------------------------------------------------------- Hugging Face directories


@pytest.fixture
def hf_dir(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ViTConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                                    image_size=28, patch_size=7, num_channels=1)
    torch.manual_seed(0)
    transformers.ViTForImageClassification(config).save_pretrained(tmp_path / "hf", safe_serialization=True)
    return tmp_path / "hf"


@pytest.fixture
def no_transformers_load(monkeypatch):
    """Fail the test if transformers or torch.load is asked to read weights."""
    import transformers

    def refuse(*args, **kwargs):
        raise AssertionError("weights were read")

    monkeypatch.setattr(transformers.ViTForImageClassification, "from_pretrained", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_hf_directory_loads(hf_dir):
    model = vitrim.load(hf_dir)
    assert type(model).__name__ == "ViTForImageClassification"


def _shard_index(hf_dir, shard):
    from safetensors.torch import load_file

    names = list(load_file(str(hf_dir / "model.safetensors")))
    (hf_dir / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {name: shard for name in names}}))
    return names


def test_hf_index_naming_a_pickle_is_refused_before_transformers(hf_dir, no_transformers_load):
    from safetensors.torch import load_file

    torch.save(load_file(str(hf_dir / "model.safetensors")), hf_dir / "pytorch_model.bin")
    _shard_index(hf_dir, "pytorch_model.bin")
    (hf_dir / "model.safetensors").unlink()
    with pytest.raises(ModelFileError, match=r"names 'pytorch_model.bin', not a \.safetensors file .*"
                                             r"save_pretrained\(\.\.\., safe_serialization=True\)"):
        vitrim.load(hf_dir)


@pytest.mark.parametrize("shard, expected", [("weights.pt", r"not a \.safetensors file"),
                                             ("../model.safetensors", "outside"),
                                             ("model-00002-of-00002.safetensors", "which .* lacks")])
def test_hf_index_naming_other_files_is_refused(hf_dir, no_transformers_load, shard, expected):
    _shard_index(hf_dir, shard)
    with pytest.raises(ModelFileError, match=expected + r".*safe_serialization=True"):
        vitrim.load(hf_dir)


def test_hf_index_that_is_not_json_is_refused(hf_dir, no_transformers_load):
    (hf_dir / "model.safetensors.index.json").write_text('{"weight_map": ["a"]}')
    with pytest.raises(ModelFileError, match="weight_map.*must map tensor names to file names"):
        vitrim.load(hf_dir)


def test_hf_directory_with_only_a_pickle_is_refused(hf_dir, no_transformers_load):
    (hf_dir / "model.safetensors").unlink()
    (hf_dir / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ModelFileError, match=r"has no model\.safetensors \(it has pytorch_model\.bin, a pickle file "
                                             r"vitrim does not load\); save the model with save_pretrained\(\.\.\., "
                                             r"safe_serialization=True\)"):
        vitrim.load(hf_dir)


@pytest.mark.parametrize("key, value, error, expected", [
    ("hidden_size", "32", ModelFileError, r"'hidden_size' must be a positive integer, got '32'"),
    ("num_hidden_layers", 1.0, ModelFileError, r"'num_hidden_layers' must be a positive integer, got 1\.0"),
    ("num_attention_heads", 0, ModelFileError, r"'num_attention_heads' must be a positive integer, got 0"),
    ("patch_size", [7, "7"], ModelFileError, r"'patch_size' must be a positive integer"),
    ("id2label", ["cat"], ModelFileError, r"'id2label' must be an object"),
    ("num_hidden_layers", 10**9, ConfigError, r"num_hidden_layers=1000000000 is beyond any model vitrim runs"),
    ("intermediate_size", 10**9, ConfigError, r"intermediate_size=1000000000 is beyond"),
    ("image_size", 28 * 2**10, ConfigError, r"image_size=28672 with patch_size=7 gives"),
])
def test_hf_config_sizes_are_checked_before_transformers(hf_dir, no_transformers_load, key, value, error, expected):
    path = hf_dir / "config.json"
    data = json.loads(path.read_text())
    data[key] = value
    path.write_text(json.dumps(data))
    with pytest.raises(error, match=expected):
        vitrim.load(hf_dir)


def test_hf_model_larger_than_ram_is_refused(hf_dir, no_transformers_load, monkeypatch):
    monkeypatch.setattr(limits, "physical_ram", lambda: 1 << 30)
    path = hf_dir / "config.json"
    data = json.loads(path.read_text())
    data.update(intermediate_size=2**20, num_hidden_layers=200)
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"config\.json: the model needs about .* 1\.0 GB of RAM; the largest part "
                                          r"comes from intermediate_size=1048576"):
        vitrim.load(hf_dir)
