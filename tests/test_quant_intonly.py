"""Integer-only simulation: the integer kernels against their float counterparts, the model, its files, the CLI."""

import json
import math

import pytest
import torch
import torch.nn.functional as F

import vitrim
from tests.conftest import uneven_config
from tests.test_data import write_idx_dir
from tests.test_quant_cli import run, wired  # noqa: F401  (the CLI with export/quantize registered)
from vitrim.models import VisionTransformer, uniform_config
from vitrim.quant import OnnxFileError, QuantConfigError, QuantizationError
from vitrim.quant.intonly import IntOnlyOptions, int_only
from vitrim.quant.intonly_file import load_int_only, quantize_int_only
from vitrim.quant.intops import (EXP_BITS, LN_BITS, dyadic, int_layernorm, int_matmul, isqrt, poly_gelu,
                                 poly_gelu_constants, requantize, shift_exp, shift_gelu, shiftmax)

G = torch.Generator().manual_seed(0)


def test_dyadic_requantization_rounds_like_the_real_multiplier():
    reals = torch.tensor([0.7318, 3.2e-5, 12.5, 1.0])
    m, k = dyadic(reals)
    assert ((m >= 2**30) & (m < 2**31)).all()
    acc = torch.randint(-2**24, 2**24, (1000, 4), generator=G)
    exact = torch.round(acc.double() * reals.double())
    assert (requantize(acc, m, k) - exact).abs().max() <= 1


def test_integer_square_root_is_exact():
    n = torch.cat([torch.tensor([0, 1, 2, 3, 4, 15, 16, 17, 2**40 - 1, 2**40]),
                   torch.randint(0, 2**50, (500,), generator=G)])
    assert isqrt(n).tolist() == [math.isqrt(v) for v in n.tolist()]


def test_int_matmul_is_exact_where_float32_would_round():
    a = torch.randint(-128, 128, (8, 1500), generator=G)
    b = torch.randint(-127, 128, (1500, 6), generator=G)
    exact = (a[:, :, None] * b[None]).sum(1)
    assert torch.equal(int_matmul(a, b, 128 * 128 * 1500), exact)  # float64 path
    assert torch.equal(int_matmul(a[:, :700], b[:700], 128 * 128 * 700), (a[:, :700, None] * b[None, :700]).sum(1))


def test_shift_exp_follows_exp():
    unit = 1000
    x = torch.arange(-8 * unit, 1)
    got = shift_exp(x, unit).double() / 2**EXP_BITS
    want = torch.exp(x.double() / unit)
    assert ((got - want).abs() <= 0.1 * want + 2.0**-EXP_BITS * 2).all()  # shift-and-add log2(e), linear 2**r


def test_shiftmax_is_a_probability_close_to_softmax():
    scale = 0.01
    scores = torch.randint(-600, 600, (64, 50), generator=G)
    probs = shiftmax(scores, scale, out_bits=8).double() / 256
    want = torch.softmax(scores.double() * scale, -1)
    assert (probs >= 0).all() and (probs.sum(-1) - 1).abs().max() < 0.1
    assert (probs - want).abs().max() < 0.06


def test_integer_gelus_follow_gelu():
    scale = 6.0 / 32767
    x = torch.arange(-32767, 32768, 7)
    want = F.gelu(x.double() * scale)
    shift = shift_gelu(x, scale).double() * scale / 256
    *constants, step = poly_gelu_constants(scale, 16)
    poly = poly_gelu(x, *constants).double() * step
    assert (shift - want).abs().max() < 0.03 * 6
    assert (poly - want).abs().max() < 0.02 and (poly - want).abs().max() < (shift - want).abs().max() / 2


def test_integer_layernorm_follows_layernorm():
    x = torch.randint(-128, 128, (32, 192), generator=G)
    got = int_layernorm(x).double() / 2**LN_BITS
    want = F.layer_norm(x.double(), (192,), eps=0)
    assert (got - want).abs().max() < 2e-3


@pytest.fixture(scope="module")
def uneven():
    torch.manual_seed(0)
    model = VisionTransformer(uneven_config(layer_scale_init=0.5)).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.head.weight.normal_(0, 0.5)
    calib = torch.randn(48, 1, 16, 16, generator=torch.Generator().manual_seed(1))
    test = torch.randn(32, 1, 16, 16, generator=torch.Generator().manual_seed(2))
    return model, calib, test


def _error(model, twin, x):
    with torch.no_grad():
        ref = model(x)
    out = twin(x)
    relative = (out - ref).abs().max().item() / (ref.max() - ref.min()).item()
    return relative, (out.argmax(1) == ref.argmax(1)).float().mean()


def test_integer_only_twin_follows_the_float_model_and_wider_is_closer(uneven):
    model, calib, test = uneven
    narrow = int_only(model, calib)
    wide = int_only(model, calib, IntOnlyOptions(act_bits=12, residual_bits=16, softmax_bits=12, gelu="poly"))
    err_narrow, agree_narrow = _error(model, narrow, test)
    err_wide, agree_wide = _error(model, wide, test)
    assert err_narrow < 0.25 and agree_narrow >= 0.75
    assert err_wide < err_narrow / 2 and agree_wide >= 0.9
    floats = [k for k, v in narrow.constants.items() if v.is_floating_point()]
    assert sorted(floats) == ["head.out", "in.scale"]  # input quantization and logit dequantization only
    assert narrow.constants["0.qkv.w"].dtype == torch.int8 and narrow.constants["0.qkv.out.m"].dtype == torch.int64


def test_unsupported_models_and_options_are_refused(uneven):
    _, calib, _ = uneven
    with pytest.raises(QuantConfigError, match="q/k normalisation"):
        int_only(VisionTransformer(uneven_config(qk_norm=True)), calib)
    with pytest.raises(QuantConfigError, match="unknown integer GELU 'erf'"):
        IntOnlyOptions(gelu="erf")
    with pytest.raises(QuantConfigError, match="residual_bits must be between 2 and 16"):
        IntOnlyOptions(residual_bits=32)
    with pytest.raises(QuantConfigError, match="canonical vitrim ViTs"):
        int_only(torch.nn.Sequential(), calib)


def test_written_model_reads_back_identical_and_bad_dirs_fail(uneven, tmp_path):
    model, calib, test = uneven
    result = quantize_int_only(model, tmp_path / "io", calib=calib, calib_size=40)
    assert result.calib_images == 40 and result.check.images == 40 and result.compression > 2
    again = load_int_only(tmp_path / "io")
    assert torch.equal(again(test), int_only(model, calib[:40])(test))
    with pytest.raises(QuantizationError, match="drifts too far from fp32.*nothing was written"):
        quantize_int_only(model, tmp_path / "strict", calib=calib, tolerance=1e-6)
    assert not (tmp_path / "strict").exists()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "intonly.json").write_text("{not json")
    with pytest.raises(OnnxFileError, match="is not a readable integer-only model"):
        load_int_only(tmp_path / "bad")


def test_cli_int_only_then_eval(capsys, tmp_path):
    torch.set_num_threads(1)
    write_idx_dir(tmp_path / "data", n_train=40, n_test=12, size=8)
    cfg = uniform_config(1, 32, 2, 2.0, image_size=8, patch_size=4, in_chans=1, num_classes=3, mean=(0.5,),
                         std=(0.5,))
    model = vitrim.create(cfg, seed=0)
    vitrim.save(model, tmp_path / "model")
    data = f"idx:{tmp_path / 'data'}"
    code, out, err = run(capsys, "quantize", str(tmp_path / "model"), "--scheme", "int-only", "--int-gelu", "poly",
                         "--calib", "24", "--data", data, "--out", str(tmp_path / "io"), "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["scheme"] == "int-only" and report["options"]["gelu"] == "poly" and report["calib_images"] == 24
    assert sorted(p.name for p in (tmp_path / "io").iterdir()) == ["intonly.json", "intonly.safetensors",
                                                                   "quantize.json"]
    code, out, err = run(capsys, "eval", str(tmp_path / "io"), "--data", data, "--json")
    assert code == 0, err
    assert json.loads(out)["count"] == 12
    code, _, err = run(capsys, "quantize", str(tmp_path / "model"), "--scheme", "int-only", "--calib-method",
                       "entropy", "--data", data, "--out", str(tmp_path / "x"))
    assert code == 2 and err.strip() == ("vitrim quantize: error: int-only sets its scales from the calibration "
                                         "images' min/max ranges; drop --calib-method")
    assert not (tmp_path / "x").exists()
