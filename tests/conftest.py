import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("VITRIM_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from vitrim.models import BlockDims, ViTConfig, VisionTransformer  # noqa: E402


def uneven_config(**overrides) -> ViTConfig:
    """A small ViT whose blocks all differ: heads, qk/v dims, MLP width, removed sub-layers."""
    blocks = [
        BlockDims(heads=3, qk_dim=8, v_dim=12, mlp_dim=40),
        BlockDims(heads=1, qk_dim=16, v_dim=4, mlp_dim=0, mlp=False, attn_scale=0.125),
        BlockDims(heads=0, qk_dim=0, v_dim=0, mlp_dim=24, attention=False),
        BlockDims(heads=2, qk_dim=5, v_dim=7, mlp_dim=9),
    ]
    kw = dict(image_size=16, patch_size=4, in_chans=1, num_classes=5, embed_dim=24, blocks=blocks,
              mean=(0.5,), std=(0.25,))
    kw.update(overrides)
    return ViTConfig(**kw)


@pytest.fixture
def uneven_model() -> VisionTransformer:
    torch.manual_seed(0)
    model = VisionTransformer(uneven_config())
    # Non-trivial weights everywhere (the default init zeroes the head and biases).
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


def coco_items(count: int, classes: int, dark_margin: bool = False):
    """Random labelled 28x28 single-channel items (class names a, b, ...) for the synthetic COCO writer."""
    from vitrim.data.dataset import ImageSet

    items = (torch.rand(count, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    if dark_margin:
        items[:, :, :4] = 0  # like Fashion-MNIST's
    names = [chr(ord("a") + i) for i in range(classes)]
    return ImageSet(items, torch.arange(count) % classes, names, (0.5,), (0.5,), name="items")
