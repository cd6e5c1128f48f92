"""The ``impure`` command: the only place that wires subcommands.

Library modules expose functions, an ``add_arguments(parser)`` and a ``run(args) -> int``; this
module registers each as a subcommand (``_SUBCOMMANDS``, and ``purify.py``'s in the list below). The
small commands that only call library functions (``make-dataset``, ``publish``, ``card``, ``convert``) are
written here. Nothing in the package imports this module.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from . import app, bench, convert, data, demo, evaluation, export, finetuning, purify, train
from ._utils import atomic_write_text, parse_eps, process_state
from .loading import DEFAULT_MODEL, HUB_REPO_IDS, load_purifier
from .publishing import (
    MODEL_CARD_TEMPLATE,
    build_model_card,
    publish,
    publish_space,
    save_hub_folder,
    upload_hub_folder,
    validate_model_card,
)

# name -> (module with add_arguments / run, help, extra keyword arguments of the subparser)
_SUBCOMMANDS = {
    "train": (train, "train a purifier (also: accelerate launch -m impure_hf.train)", {
        "description": "Train an IMPure purifier with Accelerate. Options come from --config (YAML) and flags."}),
    "finetune": (finetuning, "fine-tune a purifier for your classifier (any label set)", {
        "description": "Fine-tune an IMPure purifier for a target classifier: build adversarial pairs for it (unless "
                       "--data holds them) and train with the perceptual loss on its own layers. Takes every `impure "
                       f"train` option; fine-tuning defaults: {finetuning.FINETUNE_DEFAULTS}.",
        "conflict_handler": "resolve"}),  # finetune's --model / --classifier / --dataset replace train's
    "evaluate": (evaluation, "accuracy tables: no defence, baselines and IMPure under black-box and white-box attacks", {
        "description": evaluation.harness.__doc__.split("\n\n")[0]}),
    "demo": (demo, "attack real photos, purify them, and compare with simple baselines (offline)", {}),
    "bench": (bench, "benchmark the purifier against timm ViT-B/16", {}),
    "export": (export, "export the purifier (ONNX, checked with onnxruntime)", {}),
    "app": (app, "the attack-and-purify page in the browser (needs the app extra: Gradio)", {
        "description": "Serve a page that attacks an image and purifies it (Gradio; pip install -e \".[app]\")."}),
}


_DESCRIPTIONS = {
    "make-dataset": "Attack images with the paper's attacks and save the pairs as a Hugging Face dataset folder "
                    "(resumable; scale out with --num-proc or `accelerate launch -m impure_hf.cli make-dataset ...`).",
}


# ---------------------------------------------------------------------------------- impure make-dataset
def _make_dataset(args: argparse.Namespace) -> int:
    attacks = None if args.attacks == ["all"] else args.attacks
    out = data.build_adversarial_dataset(
        args.output_dir,
        classifiers=args.classifier,
        attacks=attacks,
        eps=args.eps,
        source=args.source,
        splits=args.splits,
        train_size=args.train_size,
        validation_size=args.validation_size,
        test_size=args.test_size,
        image_size=args.image_size,
        seed=args.seed,
        batch_size=args.batch_size,
        shard_size=args.shard_size,
        num_proc=args.num_proc,
        device=args.device,
        overwrite=args.overwrite,
        extra_train_photos=args.extra_train_photos,
        validation_fraction=args.validation_fraction,
        threads=args.threads,
    )
    if process_state().is_main_process:
        print(f"adversarial dataset written to {out} (card: {out / 'README.md'})")
    return 0



def _add_make_dataset_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("output_dir", help="dataset folder to write (rerun the same command to resume)")
    parser.add_argument("--source", default="offline", help="'offline' (packaged photos), an ImageNet folder with train/ and val/ in ImageFolder layout, or an image folder labelled for the classifier")
    parser.add_argument("--extra-train-photos", nargs="+", default=[], metavar="PATH", help="offline source: more photo files or folders for the train split's random crops (e.g. /usr/share/backgrounds/mate/nature)")
    parser.add_argument("--classifier", nargs="+", default=["efficientnet_lite0"], help="target classifier name(s): efficientnet_lite0, timm names, transformers folders / Hub ids")
    parser.add_argument("--attacks", nargs="+", default=["all"], help="attack names (fgsm cw deepfool pgd mifgsm difgsm mdfgsm apgd-ce apgd-dlr) or 'all'")
    parser.add_argument("--eps", type=parse_eps, default=16 / 255, help="L_inf budget, e.g. 16/255 (default)")
    parser.add_argument("--splits", nargs="+", default=list(data.SPLITS), choices=data.SPLITS)
    parser.add_argument("--train-size", type=int, default=None, help="offline: images (default 64); ImageNet: per class (10); other folders: per class (all)")
    parser.add_argument("--validation-size", type=int, default=None, help="offline: images (16); ImageNet: per class (5); other folders: per class (all)")
    parser.add_argument("--test-size", type=int, default=None, help="offline: foolbox photos (20); ImageNet: per class (5)")
    parser.add_argument("--image-size", type=int, default=None, help="stored image side (default: the classifier's input size)")
    parser.add_argument("--validation-fraction", type=float, default=0.2,
                        help="an image folder without val/: share of each class held out for validation")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=8, help="offline images or ImageNet classes per shard")
    parser.add_argument("--num-proc", type=int, default=1, help="worker processes on this machine")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads per process, pinned and recorded: a build is exact per machine and thread count (default 1)")
    parser.add_argument("--device", default=None, help="device of the classifiers (default: cpu, or accelerate's)")
    parser.add_argument("--overwrite", action="store_true", help="delete an existing build in output_dir first")


# ---------------------------------------------------------------------------------- impure publish / card
def _read_text_arg(value: Optional[str]) -> Optional[str]:
    """A markdown argument: a file path if one exists, else the text itself."""
    if value is None:
        return None
    path = Path(value)
    return path.read_text(encoding="utf-8") if path.is_file() else value


def _card_kwargs(args: argparse.Namespace) -> dict:
    kwargs = {"eval_results": args.eval_results, "provenance": _read_text_arg(args.provenance),
              "training_notes": _read_text_arg(args.training_notes), "template": args.template}
    return {k: v for k, v in kwargs.items() if v is not None}


def _publish(args: argparse.Namespace) -> int:
    if args.space:
        out = publish_space(args.model_dir, repo_id=args.repo_id, out_dir=args.out, dry_run=args.dry_run,
                            private=args.private)
        print(f"Space folder {'written (dry run, nothing uploaded)' if args.dry_run else 'uploaded from'}: {out}")
        return 0
    out = publish(args.model_dir, repo_id=args.repo_id, out_dir=args.out, dry_run=args.dry_run, card=args.card,
                  private=args.private, **_card_kwargs(args))
    print(f"Hub folder {'built (dry run, nothing uploaded)' if args.dry_run else 'uploaded from'}: {out}")
    return 0


def _card(args: argparse.Namespace) -> int:
    if args.model_dir is not None and args.repo_id is None:
        raise ValueError("impure card: --repo-id ORG/NAME is needed (it is shown in the loading examples)")
    model_dir = Path(args.model_dir or DEFAULT_MODEL)
    model = load_purifier(str(model_dir))
    repo_id = args.repo_id or HUB_REPO_IDS["impure-vit-tiny"]
    card = build_model_card(model, repo_id, **_card_kwargs(args))
    out = Path(args.out) if args.out else model_dir / "README.md"
    atomic_write_text(out, str(card))
    validate_model_card(out)
    print(f"model card written to {out}")
    return 0


def _add_card_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--eval-results", default=None, metavar="JSON", help="results JSON of `impure evaluate`")
    parser.add_argument("--training-notes", default=None, metavar="MD",
                        help="markdown (file or text): training data and attacks of these weights")
    parser.add_argument("--provenance", default=None, metavar="MD",
                        help="markdown (file or text): where the weights come from")
    parser.add_argument("--template", default=None, help=f"card template (default: {MODEL_CARD_TEMPLATE})")


def _add_publish_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", nargs="?", default=None, help="saved model folder (default: the embedded model)")
    parser.add_argument("--repo-id", default=None, help="Hub repo ORG/NAME (default for the embedded model: "
                                                        f"{HUB_REPO_IDS['impure-vit-tiny']})")
    parser.add_argument("--out", default=None, help="where to build the folder (default: MODEL_DIR-hub)")
    parser.add_argument("--dry-run", action="store_true", help="build and check the folder, do not upload")
    parser.add_argument("--card", default=None, help="use this model card file (default: MODEL_DIR/README.md if present)")
    parser.add_argument("--private", action="store_true", help="create the Hub repo as private")
    parser.add_argument("--space", action="store_true",
                        help="build (and upload) the demo page as a Gradio Space instead: MODEL_DIR may also be a "
                             "preset or Hub id, --out defaults to impure-space, --repo-id names the Space")
    _add_card_arguments(parser)


def _add_card_command_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", nargs="?", default=None, help="saved model folder (default: the embedded model)")
    parser.add_argument("--repo-id", default=None, help="Hub repo id shown in the loading examples")
    parser.add_argument("--out", default=None, help="output file (default: MODEL_DIR/README.md)")
    _add_card_arguments(parser)


# ---------------------------------------------------------------------------------- impure convert
def _convert(args: argparse.Namespace) -> int:
    model, info = convert.convert_release_checkpoint(
        args.checkpoint,
        preset=None if args.config_from_args else args.preset,
        num_heads=args.num_heads,
        decoder_num_heads=args.decoder_num_heads,
        trust_checkpoint=args.trust_checkpoint,
        fusion_layers=args.fusion_layers,
    )
    if info["dropped_keys"]:
        print(f"dropped {len(info['dropped_keys'])} training-only keys ({', '.join(convert.TRAINING_ONLY_PREFIXES)})")
    repo_id = args.repo_id or args.push_to_hub or HUB_REPO_IDS["impure-vit-b-release"]
    # the release ships no licence file: say so rather than relabel the authors' weights
    out = save_hub_folder(model, args.out, repo_id=repo_id, provenance=convert.conversion_summary(info), license="other",
                          license_name="unspecified", license_link=f"https://github.com/{convert.RELEASE_REPO}")
    print(f"converted {args.checkpoint} -> {out} (forward check: mean |purified - input| = "
          f"{info['forward_check_l1']:.4f})")
    if args.push_to_hub:
        print(upload_hub_folder(out, args.push_to_hub, private=args.private,
                                commit_message=f"Convert {info['checkpoint']} from {convert.RELEASE_REPO}"))
    return 0


# ---------------------------------------------------------------------------------- the parser
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="impure", description="IMPure adversarial purification")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    own = (
        ("purify", "purify image files and folders", purify.add_arguments, purify.run),
        ("make-dataset", "build an adversarial (clean, adversarial) image-pair dataset", _add_make_dataset_arguments,
         _make_dataset),
        ("publish", "build a complete Hub folder (remote code, card) and upload it", _add_publish_arguments, _publish),
        ("card", "write the model card (README.md) of a saved model", _add_card_command_arguments, _card),
        ("convert", "convert the authors' released checkpoint into a Hub folder", convert.add_arguments, _convert),
    )
    for name, help_text, add_arguments, func in own:
        command = sub.add_parser(name, help=help_text, description=_DESCRIPTIONS.get(name))
        add_arguments(command)
        command.set_defaults(func=func)
    for name, (module, help_text, kwargs) in _SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text, **kwargs)
        module.add_arguments(command)
        command.set_defaults(func=module.run)
    return parser


def main(argv: Optional[list[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
