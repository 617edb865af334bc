"""ONNX export: dynamo exporter, dynamic batch, metadata, numeric check, fallback, errors."""

import pytest
import torch
from torch import nn

import onnxruntime  # noqa: F401  (the vitrim[onnx] extra, installed by make test)

import onnx  # noqa: E402

from tests.conftest import uneven_config  # noqa: E402
from vitrim.errors import ConfigError  # noqa: E402
from vitrim.models import VisionTransformer  # noqa: E402
from vitrim.quant import (CalibrationError, ExportCheckError, OnnxModel, export)  # noqa: E402

NAMES = ["coat", "bag", "shirt", "sock", "hat"]


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = VisionTransformer(uneven_config(class_names=NAMES)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = tmp_path_factory.mktemp("export") / "uneven.onnx"
    result = export(model, path, threads=1)
    return model, path, result


def test_uneven_model_exports_with_current_exporter_and_matches_torch(exported):
    model, path, result = exported
    assert result.exporter == "dynamo" and result.fallback_reason is None
    assert result.opset >= 18 and result.path == path and path.stat().st_size == result.size_bytes
    assert result.check.passed and result.check.images == 8
    assert result.check.max_abs_diff < 1e-4 and result.check.top1_agreement == 1.0


@pytest.mark.parametrize("batch", [1, 5])
def test_batch_axis_is_dynamic(exported, batch):
    model, path, _ = exported
    runner = OnnxModel(path, threads=1)
    x = torch.randn(batch, 1, 16, 16, generator=torch.Generator().manual_seed(batch))
    with torch.no_grad():
        expected = model(x)
    got = runner(x)
    assert got.shape == (batch, 5)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_metadata_round_trips(exported):
    model, path, _ = exported
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["vitrim.image_size"] == "16" and props["vitrim.in_chans"] == "1"
    assert props["vitrim.mean"] == "[0.5]" and props["vitrim.std"] == "[0.25]"
    runner = OnnxModel(path, threads=1)
    assert runner.config == model.config  # full per-block config, removed sub-layers included
    assert runner.config.blocks[2].attention is False and runner.config.blocks[1].mlp is False
    assert runner.preprocessing.class_names == NAMES
    assert runner.quantization is None


def test_file_holds_no_source_paths_or_stack_traces(exported):
    _, path, _ = exported
    proto = onnx.load(str(path))
    assert all(len(node.metadata_props) == 0 for node in proto.graph.node)
    assert b"vit.py" not in path.read_bytes()


class Branchy(nn.Module):
    """A model with a data-dependent Python branch: torch.export refuses it, tracing bakes it in."""

    def __init__(self) -> None:
        super().__init__()
        self.vit = VisionTransformer(uneven_config())
        self.config = self.vit.config
        with torch.no_grad():
            self.vit.head.weight.normal_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.vit(x)
        if float(x.mean()) > 0:
            return logits
        return -logits


def _images(signs):
    g = torch.Generator().manual_seed(0)
    return torch.cat([s + 0.1 * torch.randn(1, 1, 16, 16, generator=g) for s in signs])


def test_falls_back_to_torchscript_and_says_so(tmp_path):
    torch.manual_seed(0)
    result = export(Branchy().eval(), tmp_path / "m.onnx", check_images=_images([1, 1, 1]), threads=1)
    assert result.exporter == "torchscript" and result.opset == 20  # the newest opset it writes
    assert result.fallback_reason.startswith("dynamo exporter:")
    assert result.fallback_reason.endswith("the TorchScript exporter writes opset 20 at most, not 23")
    assert result.check.passed and (tmp_path / "m.onnx").is_file()
    asked = export(Branchy().eval(), tmp_path / "t.onnx", check_images=_images([1, 1, 1]), threads=1,
                   exporter="torchscript")
    assert asked.opset == 20 and asked.fallback_reason == "the TorchScript exporter writes opset 20 at most, not 23"
    at_20 = export(Branchy().eval(), tmp_path / "t.onnx", check_images=_images([1, 1, 1]), threads=1,
                   exporter="torchscript", opset=20)
    assert at_20.fallback_reason is None


def test_failed_numeric_check_raises_and_writes_nothing(tmp_path):
    torch.manual_seed(0)
    with pytest.raises(ExportCheckError, match="does not match PyTorch: max \\|logit diff\\|.*nothing was written"):
        export(Branchy().eval(), tmp_path / "m.onnx", check_images=_images([1, 1, -1, -1, -1, -1]),
               exporter="torchscript", threads=1)
    assert list(tmp_path.iterdir()) == []


def test_bad_arguments_fail_before_exporting(tmp_path):
    model = VisionTransformer(uneven_config()).eval()
    with pytest.raises(ConfigError, match="opset 17 is too old"):
        export(model, tmp_path / "m.onnx", opset=17)
    with pytest.raises(ConfigError, match="unknown exporter 'jit'"):
        export(model, tmp_path / "m.onnx", exporter="jit")
    with pytest.raises(CalibrationError, match=r"must be \(N, 1, 16, 16\), got \(4, 3, 16, 16\)"):
        export(model, tmp_path / "m.onnx", check_images=torch.randn(4, 3, 16, 16))
    with pytest.raises(CalibrationError, match="empty"):
        export(model, tmp_path / "m.onnx", check_images=torch.zeros(0, 1, 16, 16))
    assert list(tmp_path.iterdir()) == []


def test_per_image_token_model_is_refused(tmp_path):
    from vitrim.quant import ExportError
    from vitrim.tokens import reduce_tokens

    model = VisionTransformer(uneven_config()).eval()
    dynamic = reduce_tokens(model, "drop", layers=[0], mode="dynamic", tau=0.9)
    with pytest.raises(ExportError, match="different number of tokens per image.*mode='static' and keep=RATIO"):
        export(dynamic, tmp_path / "m.onnx")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("method", ["drop", "evit", "tome"])
def test_static_token_models_export_and_match(tmp_path, exported, method):
    from vitrim.tokens import reduce_tokens

    model, _, _ = exported
    reduced = reduce_tokens(model, method, layers=[0], keep=0.5)
    images = torch.randn(6, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    result = export(reduced, tmp_path / "m.onnx", check_images=images, threads=1)
    assert result.check.passed
    with torch.no_grad():
        expected = reduced(images)
    assert not torch.allclose(expected, model(images), atol=1e-3)  # the reduction changed the outputs
    torch.testing.assert_close(OnnxModel(tmp_path / "m.onnx", threads=1)(images), expected, atol=1e-5, rtol=1e-4)


def _noisy(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("method,patch,exporter", [
    ("tome", 4, "dynamo"), ("tome", 4, "torchscript"), ("tome", 2, "dynamo"), ("tome", 2, "torchscript"),
    ("evit", 2, "torchscript"), ("drop", 2, "torchscript")])  # patch 4: 50 tokens, patch 2: 197
def test_static_token_models_export_at_real_token_counts(tmp_path, method, patch, exporter):
    """Several reduction steps from 50 or 197 tokens, so merge steps see odd and even counts."""
    from vitrim.models import uniform_config
    from vitrim.tokens import reduce_tokens

    torch.manual_seed(0)
    cfg = uniform_config(4, 32, 2, 2.0, image_size=28, patch_size=patch, in_chans=1, num_classes=5,
                         mean=(0.5,), std=(0.5,))
    model = _noisy(VisionTransformer(cfg))
    reduced = reduce_tokens(model, method, layers=[0, 1, 2], keep=0.7)
    images = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reduced(images)
    counts = [int(c) - 1 for c in reduced.last_token_counts]  # patch tokens each block saw
    assert counts[0] == (28 // patch) ** 2
    if method == "tome":
        assert len({c % 2 for c in counts}) == 2  # merge steps see odd and even counts
    result = export(reduced, tmp_path / "m.onnx", check_images=images, threads=1, exporter=exporter)
    assert result.exporter == exporter and result.check.passed
    torch.testing.assert_close(OnnxModel(tmp_path / "m.onnx", threads=1)(images), expected, atol=1e-4, rtol=1e-4)
