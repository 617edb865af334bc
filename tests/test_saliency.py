import pytest
import torch
import torch.nn.functional as F

from vitrim.prune.gates import gate_shapes, gated
from vitrim.prune.saliency import gradient_saliency, magnitude_saliency, saliency


def batches_of(x, y, size):
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(x), size)]


@pytest.fixture
def data():
    g = torch.Generator().manual_seed(0)
    return torch.randn(12, 1, 16, 16, generator=g), torch.randint(0, 5, (12,), generator=g)


@pytest.mark.parametrize("method", ["fisher", "taylor", "taylor2"])
def test_accumulation_across_batches_equals_one_big_batch(uneven_model, data, method):
    x, y = data
    model, x = uneven_model.double(), x.double()  # float64 end to end: only the accumulation can differ
    one = gradient_saliency(model, batches_of(x, y, 12), method)
    many = gradient_saliency(model, batches_of(x, y, 5), method)  # 5 + 5 + 2, uneven
    assert one.keys() == many.keys() == gate_shapes(model.config).keys()
    for key in one:
        torch.testing.assert_close(one[key], many[key], rtol=1e-6, atol=1e-12)


def test_fisher_matches_per_sample_gradients(uneven_model, data):
    """Reference: gradient of each sample's loss w.r.t. a shared gate, one sample at a time."""
    x, y = data
    scores = gradient_saliency(uneven_model, batches_of(x, y, 6), "fisher")
    shape = gate_shapes(uneven_model.config)["1.heads"]
    squares = torch.zeros(shape, dtype=torch.float64)
    for b in range(len(x)):
        gate = torch.ones(shape, requires_grad=True)
        with gated(uneven_model, {"1.heads": gate}):
            loss = F.cross_entropy(uneven_model(x[b : b + 1]), y[b : b + 1])
        (grad,) = torch.autograd.grad(loss, gate)
        squares += grad.double() ** 2
    torch.testing.assert_close(scores["1.heads"], 0.5 * squares / len(x), rtol=1e-5, atol=1e-12)


def test_taylor_score_predicts_small_gate_changes(uneven_model, data):
    """First-order check in float64: the loss change for a tiny gate step equals the gradient."""
    model = uneven_model.double()
    x, y = data[0].double(), data[1]
    scores = gradient_saliency(model, [(x, y)], "taylor", kinds=["mlp"])
    assert set(k.rsplit(".", 1)[1] for k in scores) == {"mlp"}
    unit = int(scores["0.mlp"].argmax())
    eps = 1e-5
    gate = torch.ones(gate_shapes(model.config)["0.mlp"], dtype=torch.float64)
    gate[unit] -= eps
    with torch.no_grad():
        base = F.cross_entropy(model(x), y).item()
        with gated(model, {"0.mlp": gate}):
            moved = F.cross_entropy(model(x), y).item()
    assert abs(moved - base) / eps == pytest.approx(scores["0.mlp"][unit].item(), rel=1e-3)


def test_parameters_untouched_and_grad_flags_restored(uneven_model, data):
    before = {n: p.clone() for n, p in uneven_model.named_parameters()}
    gradient_saliency(uneven_model, [data], "fisher")
    for n, p in uneven_model.named_parameters():
        assert torch.equal(p, before[n]) and p.requires_grad and p.grad is None


def test_magnitude_covers_every_gate(uneven_model):
    scores = magnitude_saliency(uneven_model)
    shapes = gate_shapes(uneven_model.config)
    assert {k: tuple(v.shape) for k, v in scores.items()} == shapes


def test_bad_method_and_missing_data(uneven_model):
    with pytest.raises(ValueError, match="unknown saliency 'l1'"):
        saliency(uneven_model, None, "l1")
    with pytest.raises(Exception, match="needs calibration batches"):
        saliency(uneven_model, None, "fisher")
