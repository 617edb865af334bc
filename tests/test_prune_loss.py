"""``vitrim.prune(model, target, data=..., loss=fn)``: any task's loss, ``fn(model, batch)`` a scalar."""

import pytest
import torch
import torch.nn.functional as F

import vitrim
from tests.test_prune import random_set, wide_model  # noqa: F401 (a fixture)
from vitrim.errors import ConfigError
from vitrim.prune.saliency import saliency


@pytest.fixture(scope="module")
def model(wide_model):
    return wide_model


def mean_cross_entropy(model, batch):
    images, labels = batch
    return F.cross_entropy(model(images), labels)  # the batch's mean, a scalar


def batches(model, n=24, size=8):
    data = random_set(model.config, n=n)
    return list(data.batches(size, image_size=model.config.image_size))


@pytest.mark.parametrize("method", ["fisher", "taylor", "taylor2"])
def test_a_batch_mean_loss_scores_like_the_per_sample_loss(model, method):
    """The batch mean times B has the per-sample gradients on each sample's gates: the same scores."""
    per_sample = saliency(model, batches(model), method)
    scalar = saliency(model, batches(model), method, batch_loss=mean_cross_entropy)
    assert per_sample.keys() == scalar.keys()
    for key in per_sample:
        torch.testing.assert_close(scalar[key], per_sample[key], rtol=1e-5, atol=1e-12)


def test_prune_with_a_scalar_loss_chooses_the_default_plan(model):
    data = random_set(model.config, n=32)
    options = dict(recover="none", calib_images=32, round_to=1, steps=1, progress=False)
    default = vitrim.prune(model, "flops=0.6", data, **options)
    custom = vitrim.prune(model, "flops=0.6", data, loss=mean_cross_entropy, **options)
    assert custom.model.config == default.model.config
    assert custom.kept_ratio <= 0.6


def test_a_custom_loss_needs_no_labels(model):
    """A loss that reads no labels (here: the logits' entropy) prunes unlabelled images."""
    data = random_set(model.config, n=16)
    data.labels = None

    def entropy(net, batch):
        p = net(batch[0]).softmax(-1)
        return -(p * p.clamp_min(1e-9).log()).sum(-1).mean()

    result = vitrim.prune(model, "flops=0.7", data, loss=entropy, recover="none", calib_images=16, round_to=1,
                          progress=False)
    assert result.kept_ratio <= 0.7 and result.config.objective == "labels"


def test_a_loss_that_is_not_a_scalar_is_refused(model):
    data = random_set(model.config, n=16)

    def per_sample(net, batch):
        return F.cross_entropy(net(batch[0]), batch[1], reduction="none")

    with pytest.raises(ConfigError, match=r"scalar tensor, got \(8,\); reduce it with .mean\(\)"):
        vitrim.prune(model, "flops=0.7", data, loss=per_sample, calib_images=16, batch_size=8, progress=False)


def test_a_loss_without_the_model_is_refused(model):
    data = random_set(model.config, n=8)
    with pytest.raises(ConfigError, match="does not depend on the model"):
        vitrim.prune(model, "flops=0.7", data, loss=lambda net, batch: torch.tensor(1.0), calib_images=8,
                     progress=False)


def test_the_loss_is_given_one_way(model):
    data = random_set(model.config, n=8)
    with pytest.raises(ConfigError, match="pass the loss one way"):
        vitrim.prune(model, "flops=0.7", data, loss=mean_cross_entropy,
                     loss_fn=lambda out, y: F.cross_entropy(out, y, reduction="none"), progress=False)
    with pytest.raises(ConfigError, match="loss applies to objective='labels'"):
        vitrim.prune(model, "flops=0.7", data, loss=mean_cross_entropy, objective="features", progress=False)


def test_a_loss_through_another_copy_of_the_model_is_refused(model):
    """The loss must run the model it is given: one through a copy reaches none of the gates."""
    import copy

    other = copy.deepcopy(model)
    data = random_set(model.config, n=8)
    with pytest.raises(ConfigError, match="does not pass through the model being pruned"):
        vitrim.prune(model, "flops=0.7", data, loss=lambda net, batch: mean_cross_entropy(other, batch),
                     calib_images=8, progress=False)
