"""A dense model's backbone pruned by its task's own loss; the pyramid and head stay."""

import pytest
import torch

pytest.importorskip("pycocotools")

from vitrim.bench.flops import model_cost
from vitrim.data.coco import load_coco, write_synthetic_coco
from tests.conftest import coco_items
from vitrim.dense.prune import prune_dense, task_loss
from vitrim.errors import ConfigError
from vitrim.models import VisionTransformer, uniform_config
from vitrim.models.dense import DenseHeadConfig, DenseModel


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    source = coco_items(12, 3)
    root = write_synthetic_coco(tmp_path_factory.mktemp("dp") / "set", source, train=2, val=8, canvas=32, seed=3)
    return load_coco(root, "val", image_size=32)


def dense_model(task: str) -> DenseModel:
    torch.manual_seed(0)
    backbone = VisionTransformer(uniform_config(3, 32, 4, image_size=32, patch_size=4, in_chans=1, num_classes=1,
                                                mean=(0.5,), std=(0.5,)))
    with torch.no_grad():
        for p in backbone.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return DenseModel(backbone, DenseHeadConfig(num_classes=4 if task == "segment" else 3, task=task)).eval()


@pytest.mark.parametrize("task", ["segment", "detect"])
def test_backbone_pruned_by_the_task_loss(data, task):
    model = dense_model(task)
    forward, loss_fn = task_loss(model, data)
    x = (data.images[:2].float() / 255 - 0.5) / 0.5
    with torch.no_grad():
        torch.testing.assert_close(forward(model.backbone, x), model(x))  # the same model, backbone swappable
        assert loss_fn(forward(model.backbone, x), torch.tensor([0, 1])).shape == (2,)
    pruned, result = prune_dense(model, "flops=0.6", data, steps=1, round_to=2, progress=False)
    kept = model_cost(pruned.backbone.config).flops / model_cost(model.backbone.config).flops
    assert kept <= 0.6 and pruned.backbone.config.embed_dim == 32
    assert type(pruned) is DenseModel and pruned(x).shape == model(x).shape
    torch.testing.assert_close(pruned.head.state_dict()["classifier.weight" if task == "segment" else "heatmap.weight"],
                               model.head.state_dict()["classifier.weight" if task == "segment" else "heatmap.weight"])


@pytest.mark.parametrize("task", ["segment", "detect"])
def test_the_task_loss_reaches_every_gate(data, task):
    """Fisher scores through the pyramid and head: nonzero, and different from head to head."""
    from vitrim.prune.saliency import saliency

    model = dense_model(task)
    forward, loss_fn = task_loss(model, data)
    x = (data.images.float() / 255 - 0.5) / 0.5
    scores = saliency(model.backbone, [(x, torch.arange(len(data)))], "fisher", loss_fn=loss_fn, forward=forward,
                      progress=False)
    for key in ("0.heads", "2.mlp", "1.attn_layer"):
        assert float(scores[key].sum()) > 0
    assert scores["0.heads"].std() > 0


def test_the_embedding_width_is_refused(data):
    model = dense_model("segment")
    with pytest.raises(ConfigError, match="leave 'embed' out"):
        prune_dense(model, "flops=0.6", data, structures=("heads", "embed"))
    for option in ({"kd_alpha": 0.5}, {"kd_augment": "crop"}):  # a classifier's: no labels, no crops here
        with pytest.raises(ConfigError, match=f"{next(iter(option))} .* feature map and head outputs"):
            prune_dense(model, "flops=0.6", data, recover="kd", **option)


def _distance(student: DenseModel, teacher: DenseModel, x: torch.Tensor) -> float:
    with torch.no_grad():
        return float(((student.feature_map(x) - teacher.feature_map(x)) ** 2).mean())


@pytest.mark.parametrize("task", ["segment", "detect"])
def test_distillation_matches_the_dense_feature_map_and_outputs(data, task):
    from vitrim.dense.segmentation import normalised_batches

    model = dense_model(task)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = next(normalised_batches(data, 8))[1]
    options = dict(steps=1, round_to=1, progress=False, seed=0)
    plain, _ = prune_dense(model, "flops=0.5", data, recover="none", **options)
    distilled, result = prune_dense(model, "flops=0.5", data, recover="kd", kd_epochs=8, kd_batch_size=4,
                                    kd_lr=3e-4, **options)
    assert result.config.recover == "kd" and distilled.config == plain.config
    assert result.config.kd_epochs == 8 and result.config.kd_lr == 3e-4  # the settings used, as reported
    assert _distance(distilled, model, x) < 0.8 * _distance(plain, model, x)
    torch.testing.assert_close(model.state_dict(), before, rtol=0, atol=0)  # the teacher is left as it was
    assert all(p.requires_grad for p in model.parameters()) and not model.training


@pytest.mark.parametrize("task", ["segment", "detect"])
def test_vitrim_prune_takes_a_dense_model_and_its_batch_loss(data, task):
    """``vitrim.prune(dense, target, data=..., loss=fn)``: ``fn`` sees the dense model on the backbone
    being pruned and the batch's targets; the backbone alone is pruned, the pyramid and head kept."""
    import torch.nn.functional as F

    import vitrim
    from vitrim.dense.detection import detection_loss

    model = dense_model(task)
    seen = []

    def loss(net, batch):
        images, targets = batch
        seen.append((type(net), type(targets)))
        if task == "segment":
            return F.cross_entropy(net(images), targets)
        return detection_loss(net(images), targets, net.stride)

    result = vitrim.prune(model, "flops=0.6", data, loss=loss, steps=1, round_to=2, progress=False)
    pruned = result.model
    assert type(pruned) is DenseModel and result.kept_ratio <= 0.6
    assert seen and all(net is DenseModel for net, _ in seen)
    assert all(kind is (torch.Tensor if task == "segment" else list) for _, kind in seen)
    x = (data.images[:2].float() / 255 - 0.5) / 0.5
    assert pruned(x).shape == model(x).shape
    for name, weight in model.head.state_dict().items():
        torch.testing.assert_close(pruned.head.state_dict()[name], weight)


def test_the_batch_loss_ranks_like_the_task_loss(data):
    """A segmenter's mean cross-entropy over a batch scores every gate as the per-image task loss does."""
    import torch.nn.functional as F

    from vitrim.dense.prune import batch_task_loss
    from vitrim.prune.saliency import saliency

    model = dense_model("segment")
    forward, loss_fn = task_loss(model, data)
    x = (data.images.float() / 255 - 0.5) / 0.5
    batches = [(x, torch.arange(len(data)))]
    exact = saliency(model.backbone, batches, "fisher", loss_fn=loss_fn, forward=forward)
    scalar = saliency(model.backbone, batches, "fisher",
                      batch_loss=batch_task_loss(model, data, lambda net, b: F.cross_entropy(net(b[0]), b[1])))
    for key in exact:
        torch.testing.assert_close(scalar[key], exact[key], rtol=1e-4, atol=1e-12)


def test_a_dense_model_refuses_per_sample_loss_functions(data):
    import vitrim

    with pytest.raises(ConfigError, match="a dense model's loss is loss=fn"):
        vitrim.prune(dense_model("segment"), "flops=0.6", data, loss_fn=lambda out, y: out.sum(), progress=False)


def test_a_dense_model_needs_dense_data(data):
    import vitrim
    from tests.test_prune import random_set

    model = dense_model("segment")
    with pytest.raises(ConfigError, match="needs its task's data .* got ImageSet"):
        vitrim.prune(model, "flops=0.6", random_set(model.backbone.config, n=8), progress=False)
    with pytest.raises(ConfigError, match="magnitude saliency reads no loss"):
        vitrim.prune(model, "flops=0.6", data, loss=lambda net, batch: net(batch[0]).mean(), saliency="magnitude",
                     progress=False)
