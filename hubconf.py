"""torch.hub entry points of impure_hf.

    import torch
    purifier = torch.hub.load("impure-hf/impure_hf", "impure_vit_tiny")          # embedded weights
    purifier = torch.hub.load("impure-hf/impure_hf", "impure_vit_b_release")     # Hub weights, HF cache
    model = torch.hub.load("impure-hf/impure_hf", "purified_classifier", classifier=my_classifier)

``pretrained=True`` loads weights from the Hugging Face Hub through the HF cache (so a second call
works offline), or for ``impure_vit_tiny`` from the weights shipped inside the package;
``pretrained=False`` builds the untrained preset. Extra keyword arguments go to ``from_pretrained``
(``cache_dir``, ``local_files_only``, ``revision``, config overrides) or to the preset.
"""

dependencies = ["torch", "transformers", "huggingface_hub", "safetensors", "PIL", "numpy"]


def _purifier(preset: str, pretrained: bool, repo_id: "str | None", **kwargs):
    from impure_hf.loading import HUB_REPO_IDS, load_purifier

    return load_purifier((repo_id or HUB_REPO_IDS[preset]) if pretrained else preset, **kwargs)


def impure_vit_b(pretrained: bool = True, repo_id: "str | None" = None, **kwargs):
    """IMPure purifier, the paper's ViT-B/16 setting (224 px, 4 subsets, image + feature noise).

    Args:
        pretrained: load the trained weights from the Hub repo ``repo_id`` (through the HF cache);
            False builds the untrained ``impure-vit-b`` preset.
        repo_id: Hub repo id or local folder of the weights (default ``impure-hf/impure-vit-b``).
        **kwargs: passed to ``ImpureModel.from_pretrained`` / ``from_preset`` (e.g. ``device``,
            ``cache_dir``, ``local_files_only=True``, ``decoder_chunk_size=1``).

    Returns:
        ``ImpureModel`` in eval mode: ``model(x, generator=g).purified_pixel_values`` maps
        [0, 1] images (N, 3, H, W) to purified [0, 1] images.
    """
    return _purifier("impure-vit-b", pretrained, repo_id, **kwargs)


def impure_vit_b_release(pretrained: bool = True, repo_id: "str | None" = None, **kwargs):
    """IMPure purifier with the authors' released weights, converted (ViT-B/16, 28x28 position grid).

    Converted from github.com/NoWindButRain/IMPure with ``impure convert``; evaluated with the uniform
    division of the authors' evaluation script. Args as ``impure_vit_b`` (default repo id
    ``impure-hf/impure-vit-b-release``); ``pretrained=False`` builds the untrained
    ``impure-vit-b-release`` preset.
    """
    return _purifier("impure-vit-b-release", pretrained, repo_id, **kwargs)


def impure_vit_tiny(pretrained: bool = True, repo_id: "str | None" = None, **kwargs):
    """Small IMPure purifier (ViT-Tiny width) — the package's embedded CPU-trained demonstration model.

    Args:
        pretrained: load the weights shipped inside the package (``impure_hf.DEFAULT_MODEL``), or
            from ``repo_id`` when given; False builds the untrained ``impure-vit-tiny`` preset.
        repo_id: a Hub repo id (e.g. ``impure-hf/impure-vit-tiny``) or a local folder instead of
            the embedded weights.
        **kwargs: as ``impure_vit_b``.

    Note: a small demonstration model, not the paper's ImageNet purifier.
    """
    if pretrained and repo_id is None:
        from pathlib import Path

        from impure_hf.loading import DEFAULT_MODEL

        if not (Path(DEFAULT_MODEL) / "config.json").is_file():
            raise FileNotFoundError(
                f"the embedded impure-vit-tiny weights are not in this installation ({DEFAULT_MODEL}); "
                "use impure_vit_tiny(pretrained=False) for an untrained model, or repo_id='ORG/NAME' "
                "(or a folder) for published weights"
            )
        repo_id = DEFAULT_MODEL
    return _purifier("impure-vit-tiny", pretrained, repo_id, **kwargs)


def purified_classifier(classifier, purifier=None, num_samples: int = 1, **kwargs):
    """A classifier behind an IMPure purifier: [0, 1] images in, logits out.

    Args:
        classifier: ``nn.Module`` taking [0, 1] images (N, 3, H, W) (with its own normalisation)
            and returning logits.
        purifier: an ``ImpureModel``; or the name of an entry point of this file
            (``"impure_vit_b"``, ``"impure_vit_b_release"``, ``"impure_vit_tiny"``), a Hub repo id or a
            folder; default: the embedded ``impure_vit_tiny`` weights.
        num_samples: average the logits over this many stochastic purifications.
        **kwargs: passed to the purifier's loader when ``purifier`` is not a model.

    Returns:
        ``impure_hf.PurifiedClassifier`` in eval mode.
    """
    from torch import nn

    from impure_hf.defended import PurifiedClassifier
    from impure_hf.loading import load_purifier

    if purifier is None:
        purifier = impure_vit_tiny(**kwargs)
    elif isinstance(purifier, str):
        entry = _PURIFIERS.get(purifier)
        purifier = entry(**kwargs) if entry is not None else load_purifier(purifier, **kwargs)
    elif not isinstance(purifier, nn.Module):
        raise TypeError(f"purifier must be an ImpureModel, an entry-point name, a Hub id or a folder, got {type(purifier).__name__}")
    return PurifiedClassifier(purifier, classifier, num_samples=num_samples).eval()


_PURIFIERS = {"impure_vit_b": impure_vit_b, "impure_vit_b_release": impure_vit_b_release, "impure_vit_tiny": impure_vit_tiny}
