"""Old import path, kept for users' code: loading moved to ``impure_hf.loading``, Hub folders, model
cards and the Space to ``impure_hf.publishing``; the ``impure publish`` / ``card`` / ``convert``
subcommands are wired in ``impure_hf.cli``."""

from .loading import DEFAULT_MODEL, HUB_REPO_IDS, load_purifier
from .publishing import (
    CLEAN_ROW,
    GITHUB_REPO,
    HUB_FOLDER_FILES,
    MODEL_CARD_TEMPLATE,
    REMOTE_CODE_FILES,
    add_to_hf_cache,
    build_model_card,
    check_hub_folder,
    load_eval_results,
    publish,
    save_hub_folder,
    upload_hub_folder,
    validate_model_card,
)

__all__ = [
    "CLEAN_ROW",
    "DEFAULT_MODEL",
    "GITHUB_REPO",
    "HUB_FOLDER_FILES",
    "HUB_REPO_IDS",
    "MODEL_CARD_TEMPLATE",
    "REMOTE_CODE_FILES",
    "add_to_hf_cache",
    "build_model_card",
    "check_hub_folder",
    "load_eval_results",
    "load_purifier",
    "publish",
    "save_hub_folder",
    "upload_hub_folder",
    "validate_model_card",
]
