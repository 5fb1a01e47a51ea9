"""The shipped recipes: YAML configs inside the package, so an installed wheel has them too.

One file per recipe, the one source for ``upernet-vit train NAME`` and for the nnU-Net recipe trainers
(``integrations/nnunet/trainer.py``: each class names its file). A checkout's ``configs/`` points here.

    demo               the main job: a small random-init ViT on the built-in demo data
    upernet            the seed recipe: DINOv3 ViT-L/16, hidden 512, PPM scales 1/2/3/6
    dinov2_base        DINOv2 ViT-B/14, full fine-tuning (AdamW 1e-4, layer decay 0.9)
    dinov3_large       DINOv3 ViT-L/16, full fine-tuning
    dinov3_large_lora  DINOv3 ViT-L/16, LoRA rank 8 on qkv
    dinov3_7b_lora     DINOv3 ViT-7B/16, LoRA on a bfloat16 backbone for one 24 GB GPU
    retfound           RETFound MAE ViT-L/16 (retina), full fine-tuning
    visionfm           VisionFM ViT-B/16 (ophthalmology), full fine-tuning
"""
from __future__ import annotations

import os
from importlib import resources
from typing import List

SUFFIX = ".yaml"


def recipe_names() -> List[str]:
    """The shipped recipes' names, sorted."""
    return sorted(entry.name[: -len(SUFFIX)] for entry in resources.files(__name__).iterdir()
                  if entry.name.endswith(SUFFIX))


def is_recipe_name(name: str) -> bool:
    """Whether ``name`` has the form of a recipe name (no folder, no suffix), not of a file path."""
    return bool(name) and os.sep not in name and "/" not in name and not name.endswith((SUFFIX, ".yml"))


def recipe_path(name: str) -> str:
    """The file of recipe ``name``; a FileNotFoundError lists the recipes."""
    if is_recipe_name(name) and name in recipe_names():
        return os.fspath(resources.files(__name__) / f"{name}{SUFFIX}")
    raise FileNotFoundError(f"no recipe named {name!r}; the recipes are: {', '.join(recipe_names())}")


def resolve_config(source: str) -> str:
    """A config file path as given, or the file of the recipe named ``source``: an existing file wins, a
    name without folder or suffix is looked up among the recipes; anything else is a FileNotFoundError
    that names both."""
    if os.path.isfile(source):
        return source
    if is_recipe_name(source):
        return recipe_path(source)
    raise FileNotFoundError(
        f"config file {source!r} does not exist (a recipe is named without folder or suffix, e.g. 'demo'; the "
        f"recipes are: {', '.join(recipe_names())})"
    )
