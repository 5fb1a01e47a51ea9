"""Shared test helpers (imported as a plain module: pytest puts tests/ on sys.path)."""
from upernet_vit import UperNetViT

TINY = dict(depth=4, embed_dim=32, num_heads=2)


def tiny_model(**overrides) -> UperNetViT:
    """A depth-4, width-32 ViT with a 32-channel head: fast enough for property tests."""
    kwargs = dict(
        backbone="vit_small_patch16_224",
        backbone_size=None,
        num_classes=3,
        in_chans=3,
        decoder_channels=32,
        backbone_kwargs=dict(TINY),
    )
    kwargs.update(overrides)
    return UperNetViT(**kwargs)
