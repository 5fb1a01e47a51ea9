"""``upernet-vit`` command line: train, predict, evaluate, export, make-demo."""
from __future__ import annotations

import argparse
import errno
import json
import logging
import os
import re
import sys
import traceback
from typing import Dict, List, Mapping, Optional

import yaml

from .precision import SPELLINGS


def _apply_overrides(data: dict, overrides: List[str]) -> dict:
    """``key.sub=value`` pairs (values parsed as YAML) onto a nested dict."""
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"--override {item!r}: expected key.path=value")
        key, raw = item.split("=", 1)
        node = data
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"--override {item!r}: {part!r} is not a section")
        try:
            node[parts[-1]] = yaml.safe_load(raw)
        except yaml.YAMLError as err:
            where = getattr(err, "problem", None) or str(err).splitlines()[0]
            raise ValueError(f"--override {key}: the value {raw!r} is not valid YAML ({where}); close its brackets "
                             f"and quotes, e.g. -o '{key}={{background: 0, lesion: 1}}' for a mapping") from None
    return data


CLI_HANDLER = "upernet-vit-cli"  # the name of the handlers the command line adds, so that it replaces only its own

# {Python parameter: flag} per command. The library's errors and log records name the parameters a Python
# caller passed (predict(step=...), Trainer(output_dir, resume=...)); the command line shows its flags instead.
FLAGS: Dict[str, Dict[str, str]] = {
    "train": {"output_dir": "--output", "resume": "--resume"},
    "predict": {
        "model_path": "--model", "input_path": "--input", "output_dir": "--output", "device": "--device",
        "step": "--step", "scales": "--scales", "checkpoint": "--checkpoint", "mirror": "--mirror",
        "save_probabilities": "--probabilities", "amp": "--amp", "overwrite": "--overwrite",
        "intensity_scale": "--intensity-scale", "accept_intensity": "--accept-intensity",
        "resume": "--resume",  # "finish the run (train resume=True)"
    },
    "evaluate": {"pred_dir": "--pred", "gt_dir": "--gt", "labels_file": "--labels", "labels": "--labels",
                 "path": "--output"},  # check_summary_path's and write_summary's path: the summary
    "export": {"path": "--output", "checkpoint": "--checkpoint", "resume": "--resume"},  # check_export_path's
}


def _with_flags(text: str, flags: Mapping[str, str]) -> str:
    """``text`` with the parameter names of ``flags`` written as the flags. A name counts only where it cannot
    be an ordinary word (nor part of a path or quoted value): as a keyword argument (``step=0.05`` ->
    ``--step 0.05``, ``overwrite=True`` -> ``--overwrite``, ``checkpoint='latest'`` -> ``--checkpoint latest``,
    ``scales=[1, 2]`` -> ``--scales 1 2``), spelled with an underscore (``output_dir``), or opening the
    message as its subject (``device 'gpu' is not a device``, as ``resolve_device(option=)`` writes it)."""
    if not flags:
        return text
    names = "|".join(re.escape(n) for n in sorted(flags, key=len, reverse=True))
    pattern = (r"(?P<quoted>(?<!\w)'[^'\n]*'|(?<!\w)\"[^\"\n]*\")|"  # a quoted value (a path): left as it is
               rf"(?<![\w./\\'\"=-])(?P<name>{names})"  # not inside a word, path, quoted value or flag
               rf"(?:(?P<switch>=True\b)|='(?P<word>[A-Za-z][\w-]*)'|=\[(?P<items>[^\]]*)\]|(?P<assign>=)"
               rf"|(?![\w/\\-]|\.\w))")

    def flag(match: "re.Match[str]") -> str:
        if match["quoted"] is not None:
            return match["quoted"]
        name, shown = match["name"], flags[match["name"]]
        if match["switch"]:
            return shown
        if match["word"] is not None:
            return f"{shown} {match['word']}"
        if match["items"] is not None:
            return f"{shown} {' '.join(match['items'].replace(',', ' ').split())}"
        if match["assign"]:
            return f"{shown} "
        return shown if "_" in name or match.start() == 0 else name  # a bare "step" may be the English word

    return re.sub(pattern, flag, text)


class _FlagFormatter(logging.Formatter):
    """The CLI's log lines, with the command's flags for the parameter names (:func:`_with_flags`)."""

    def __init__(self, flags: Mapping[str, str]) -> None:
        super().__init__("%(asctime)s %(message)s", datefmt="%H:%M:%S")
        self.flags = flags

    def formatMessage(self, record: logging.LogRecord) -> str:
        shown = logging.makeLogRecord(record.__dict__)  # a copy: the caller's own handlers see the record as logged
        shown.message = _with_flags(record.message, self.flags)
        return super().formatMessage(shown)


class _ProgressAwareHandler(logging.StreamHandler):
    """A stream handler whose lines never land on a progress bar's line: ``tqdm.write`` clears the bars on
    the stream, writes the line and draws them again."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # as logging.StreamHandler does: a failed log line must not end the run
            self.handleError(record)


def _package_logger() -> logging.Logger:
    return logging.getLogger(__name__.rsplit(".", 1)[0])


def _setup_logging(output_dir: Optional[str] = None, flags: Optional[Mapping[str, str]] = None) -> None:
    """What the user sees: the package's log records (INFO and up) on stderr and, for a run, in its
    ``train.log``, naming the command's ``flags`` (:data:`FLAGS`). The handlers go on the package's logger,
    not the root: a program that calls ``main`` keeps its own logging as it set it up."""
    package = _package_logger()
    for handler in [h for h in package.handlers if h.get_name() == CLI_HANDLER]:  # an earlier call's
        package.removeHandler(handler)
        handler.close()
    handlers: List[logging.Handler] = [_ProgressAwareHandler(sys.stderr)]
    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        handlers.append(logging.FileHandler(os.path.join(output_dir, "train.log")))
    for handler in handlers:
        handler.set_name(CLI_HANDLER)
        handler.setFormatter(_FlagFormatter(flags or {}))
        package.addHandler(handler)
    package.setLevel(logging.INFO)


def _fast_paths(args: argparse.Namespace) -> Optional[Dict[str, bool]]:
    """``upernet_vit.fast.optimize`` flags over its defaults (the measured policy), from ``--reference`` /
    ``--winograd``; None: the reference model."""
    return None if args.reference else {"winograd": args.winograd}


def _add_fast_flags(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--winograd", action="store_true",
                       help="3x3 head convs by Winograd F(2x2,3x3) on CPU fp32: faster on some CPUs, slower on others")
    group.add_argument("--reference", action="store_true",
                       help="run the reference model as built, without the upernet_vit.fast paths")


def cmd_train(args: argparse.Namespace) -> int:
    from .config import load_config, read_yaml
    from .training.trainer import Trainer

    from .recipes import recipe_names, resolve_config

    given = args.config_path or args.config
    if not given:
        raise ValueError(f"give a recipe name ({', '.join(recipe_names())}) or a config file: upernet-vit train "
                         f"NAME|CONFIG (or --config CONFIG)")
    config_path = resolve_config(given)
    data = read_yaml(config_path) or {}
    overrides = list(args.override or [])
    if args.data:
        fmt = "nnunet" if os.path.isfile(os.path.join(args.data, "dataset.json")) else "folders"
        overrides += [f"data.root={args.data}", f"data.format={fmt}"]
    if args.fold is not None:
        overrides.append(f"data.fold={args.fold}")
    config = load_config(_apply_overrides(data, overrides))
    name = os.path.splitext(os.path.basename(config_path))[0]
    output = args.output or config.train.output_dir or os.path.join("runs", name)
    if int(os.environ.get("RANK", "0")) == 0:
        from .runs.run_folder import claim_run_folder

        claim_run_folder(output, {"data.root": config.data.root})  # before train.log: never among the user's files
        _setup_logging(output, flags=FLAGS["train"])
    logging.getLogger(__name__).info("run folder: %s", os.path.abspath(output))
    trainer = Trainer(config, output, resume=args.resume, fast=_fast_paths(args))
    history = trainer.run()
    if history and trainer.dist.is_main:
        last = history[-1]
        print(
            f"done: {len(history)} epochs, val Dice (fg mean) {last['val_dice_mean']:.4f}, "
            f"EMA {last['ema_dice']:.4f}; run folder {output}"
        )
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    from .inference.predict import predict

    _setup_logging(flags=FLAGS["predict"])
    written = predict(
        args.model, args.input, args.output, args.device, args.step, args.mirror, args.probabilities, args.amp,
        fast=_fast_paths(args), checkpoint=args.checkpoint, scales=args.scales, overwrite=args.overwrite,
        intensity_scale=args.intensity_scale, accept_intensity=args.accept_intensity,
    )
    print(f"wrote {len(written)} mask(s) to {args.output}")
    return 0


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .fileio import read_json
    from .inference.evaluate import SUMMARY_NAME, check_summary_path, evaluate, write_summary

    _setup_logging(flags=FLAGS["evaluate"])  # its warnings name --pred and --labels
    labels = None
    ignore = None
    if args.labels:
        meta = read_json(args.labels)
        labels = meta.get("labels", meta) if isinstance(meta, dict) else None
        if not isinstance(labels, dict) or not all(isinstance(v, int) for k, v in labels.items() if k != "ignore"):
            raise ValueError(f"--labels {args.labels}: expected a dataset.json or a JSON object of name: integer value")
        labels = dict(labels)
        ignore = labels.pop("ignore", None)
    out = args.output or os.path.join(args.pred, SUMMARY_NAME)
    check_summary_path(out, args.pred, args.gt, args.labels)  # before the work, not after
    summary = evaluate(args.pred, args.gt, labels, ignore)
    write_summary(summary, out)
    def fmt(value):
        return "   n/a" if value is None else f"{value:.4f}"

    print(f"{'label':>20s}  {'Dice':>6s}  {'IoU':>6s}  {'Dice, mean over cases':>21s}")
    for name in summary["dice"]:
        print(f"{name:>20s}  {fmt(summary['dice'][name])}  {fmt(summary['iou'][name])}  {fmt(summary['mean_case_dice'][name]):>21s}")
    print(f"{'foreground mean':>20s}  {fmt(summary['foreground_mean_dice'])}  {'':6s}  "
          f"{fmt(summary['foreground_mean_case_dice']):>21s}   (summary: {out})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import torch

    from .export import export_onnx
    from .export.onnx import check_export_path
    from .model import UperNetViT
    from .runs.checkpoints import resolve_model_dir
    from .runs.outputs import refuse_overlap
    from .runs.record import read_record

    _setup_logging(flags=FLAGS["export"])
    model_dir = resolve_model_dir(args.model, args.checkpoint)
    refuse_overlap(args.output, {"model folder": model_dir}, "--output", ": export would write among its files")
    check_export_path(args.output)
    model = UperNetViT.from_pretrained(model_dir)
    if any(p.dtype != torch.float32 for p in model.parameters()):
        logging.getLogger(__name__).info("exporting in float32: the model stores its backbone in %s, which "
                                         "onnxruntime's CPU convolutions do not take", model.config.backbone_dtype)
        model.float()
    record = read_record(model_dir)
    # normalization and label values travel in the file's metadata
    metadata = {"upernet_vit.preprocessing": json.dumps(record.to_json())} if record else {}
    # default size: the training patch, else 8 ViT patches; at least 3 patches (what a dynamic export needs)
    patch = record.patch_size if record and record.patch_size else [8 * model.patch_size] * 2
    default = [max(s, 3 * model.patch_size) for s in patch]
    height, width = args.height or default[0], args.width or default[1]
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    diffs = export_onnx(model, args.output, height, width, dynamic=not args.static, opset=args.opset,
                        check=not args.no_check, metadata=metadata)
    axes = f"fixed [1, {model.in_chans}, {height}, {width}]" if args.static else "dynamic batch, height, width"
    worst = f", max |onnxruntime - pytorch| {max(diffs.values()):.1e}" if diffs else ""
    print(f"wrote {args.output} (input 'image': {axes}{worst})")
    return 0


def cmd_accept_edits(args: argparse.Namespace) -> int:
    from .pretrained import CHECKSUMS_NAME, accept_edits

    changed = accept_edits(args.model)
    print(f"{os.path.join(args.model, CHECKSUMS_NAME)}: " + (f"accepted the edits of {', '.join(changed)}" if changed
                                                            else "nothing had changed"))
    return 0


def cmd_make_demo(args: argparse.Namespace) -> int:
    from .data.demo import write_demo_dataset

    write_demo_dataset(args.output, args.num_train, args.num_test, args.size)
    print(f"wrote the demo dataset (nnU-Net raw layout) to {args.output}")
    return 0


def cmd_nnunet_path(args: argparse.Namespace) -> int:
    from .integrations.nnunet import EXT_TRAINER_DIR

    print(EXT_TRAINER_DIR)
    return 0


def cmd_nnunet_train(args: argparse.Namespace, extra: List[str]) -> int:
    """Seed-style ``nnunet-train DATASET 2d FOLD --config C``: nnUNetv2_train with our trainer."""
    import shutil
    import subprocess

    from .config import load_config
    from .integrations.nnunet import CONFIG_ENV, EXT_TRAINER_DIR

    env = dict(os.environ)
    if args.config:
        from .recipes import resolve_config

        path = resolve_config(args.config)  # a file, or a recipe's name
        load_config(path)  # fail here, with the key path, rather than inside nnU-Net
        env[CONFIG_ENV] = os.path.abspath(path)
    paths = [EXT_TRAINER_DIR] + [p for p in env.get("nnUNet_extTrainer", "").split(os.pathsep) if p]
    env["nnUNet_extTrainer"] = os.pathsep.join(dict.fromkeys(paths))
    exe = shutil.which("nnUNetv2_train", path=os.path.dirname(sys.executable) + os.pathsep + env.get("PATH", ""))
    if exe is None:
        raise SystemExit('nnunet-train: nnUNetv2_train not found; install the extra: pip install -e ".[nnunet]"')
    command = [exe, str(args.dataset), args.configuration, str(args.fold), "-tr", args.trainer, *extra]
    print("running:", " ".join(command), f"({CONFIG_ENV}={env.get(CONFIG_ENV, '')})", flush=True)
    return subprocess.call(command, env=env)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__
    from .runs.checkpoints import CHECKPOINT_CHOICES

    parser = argparse.ArgumentParser(prog="upernet-vit", description="UperNet on plain ViT backbones")
    parser.add_argument("--version", action="version", version=f"upernet-vit {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="on failure, print the traceback too")

    train = sub.add_parser("train", parents=[common], help="train from a YAML config")
    train.add_argument("config_path", nargs="?", metavar="RECIPE|CONFIG",
                       help="a shipped recipe by name (demo, dinov2_base, ...: upernet_vit/recipes) or a YAML file")
    train.add_argument("--config", help="the same, seed-style spelling")
    train.add_argument("--data", help="dataset folder: nnU-Net raw (with dataset.json) or images/ + masks/")
    train.add_argument("--fold", help="fold 0-4 or 'all'")
    train.add_argument("--override", "-o", action="append", metavar="KEY=VALUE", help="e.g. train.num_epochs=5")
    train.add_argument("--output", help="run folder (default: runs/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue the run in --output from checkpoint_latest")
    _add_fast_flags(train)
    train.set_defaults(func=cmd_train)

    pred = sub.add_parser("predict", parents=[common], help="predict masks with a trained model")
    pred.add_argument("--model", required=True, nargs="+", metavar="RUN",
                      help="run folder or save_pretrained folder; several: an ensemble (probabilities averaged)")
    pred.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="final",
                      help="which checkpoint of a run folder: final (the last epoch, as nnU-Net; default), best "
                           "(the EMA-Dice pick) or latest (an unfinished run)")
    pred.add_argument("--scales", type=float, nargs="+", default=[1.0], metavar="S",
                      help="multi-scale test-time augmentation, e.g. --scales 0.75 1.0 1.25 (default: 1.0)")
    pred.add_argument("--input", required=True, help="image file or folder (nnU-Net imagesTs naming; multi-page stacks, stack folders and NIfTI volumes too)")
    pred.add_argument("--output", required=True, help="folder for the masks: <case>.png, <case>.tif for a stack, <case>.nii.gz for a volume")
    pred.add_argument("--device", default="auto", help="auto (a GPU if there is one), cpu, cuda or cuda:N")
    pred.add_argument("--step", type=float, default=0.5, help="sliding-window step as a fraction of the patch")
    pred.add_argument("--mirror", action="store_true", help="flip test-time augmentation (the image and its 3 flips, averaged)")
    pred.add_argument("--probabilities", action="store_true", help="also write <case>_probs.npz")
    pred.add_argument("--amp", choices=list(SPELLINGS), default="none",
                      help="autocast dtype (bf16: CPU or CUDA; fp16: CUDA only)")
    pred.add_argument("--overwrite", action="store_true",
                      help="replace the earlier prediction set of other models or inputs in --output (only the files "
                           "its predictions.json lists)")
    pred.add_argument("--intensity-scale", type=float, metavar="S",
                      help="for a model folder without preprocessing.json: its training inputs were divided by S "
                           "(e.g. 255 for 8-bit images) before the backbone's mean/std")
    pred.add_argument("--accept-intensity", action="store_true",
                      help="predict inputs whose value range does not match the model's training record (a warning "
                           "instead of an error)")
    _add_fast_flags(pred)
    pred.set_defaults(func=cmd_predict)

    ev = sub.add_parser("evaluate", parents=[common], help="Dice/IoU of predicted masks against ground truth")
    ev.add_argument("--pred", required=True, help="folder of predicted label maps (<case>.png, <case>.tif stacks, <case>.nii.gz volumes)")
    ev.add_argument("--gt", required=True, help="folder of ground-truth label maps with the same names")
    ev.add_argument("--labels", help="a JSON file: dataset.json, or one holding a name->value mapping; "
                    "default: the values in --gt, named class_<value>")
    ev.add_argument("--output", help="summary JSON, with nnU-Net's summary.json fields (default: <pred>/summary.json)")
    ev.set_defaults(func=cmd_evaluate)

    exp = sub.add_parser("export", parents=[common], help="export a trained model to ONNX, checked against PyTorch with onnxruntime")
    exp.add_argument("model", metavar="CHECKPOINT_DIR_OR_RUN", help="run folder or a save_pretrained folder")
    exp.add_argument("--checkpoint", choices=CHECKPOINT_CHOICES, default="final",
                     help="which checkpoint of a run folder (default: final, the last epoch)")
    exp.add_argument("--format", choices=["onnx"], default="onnx", help="the file format (onnx)")
    exp.add_argument("--output", required=True, help="the model file, e.g. model.onnx")
    exp.add_argument("--height", type=int, help="example (with --static: the) input height; default: the "
                     "training patch from preprocessing.json, else 8 ViT patches")
    exp.add_argument("--width", type=int, help="example (with --static: the) input width; default: as --height")
    exp.add_argument("--static", action="store_true", help="fixed input [1, C, H, W] instead of dynamic axes")
    exp.add_argument("--opset", type=int, help="ONNX opset (default: the exporter's)")
    exp.add_argument("--no-check", action="store_true", help="skip the onnxruntime comparison with PyTorch")
    exp.set_defaults(func=cmd_export)

    accept = sub.add_parser("accept-edits", parents=[common],
                            help="record a model folder's files as they are now, after a deliberate edit")
    accept.add_argument("model", metavar="MODEL_DIR", help="a save_pretrained folder (e.g. RUN/checkpoint_latest)")
    accept.set_defaults(func=cmd_accept_edits)

    demo = sub.add_parser("make-demo", parents=[common], help="write the built-in demo data as an nnU-Net raw dataset")
    demo.add_argument("output", help="a new or empty folder (or an earlier demo dataset)")
    demo.add_argument("--num-train", type=int, default=48, help="training cases (imagesTr/labelsTr; default 48)")
    demo.add_argument("--num-test", type=int, default=8, help="test cases (imagesTs/labelsTs; default 8)")
    demo.add_argument("--size", type=int, default=96, help="image side in pixels (default 96)")
    demo.set_defaults(func=cmd_make_demo)

    path = sub.add_parser("nnunet-path", parents=[common], help="print the folder to export as nnUNet_extTrainer")
    path.set_defaults(func=cmd_nnunet_path)

    nn_train = sub.add_parser(
        "nnunet-train", parents=[common], help="nnUNetv2_train with an UperNetViT trainer; extra arguments go to nnUNetv2_train"
    )
    nn_train.add_argument("dataset", help="nnU-Net dataset id or name")
    nn_train.add_argument("configuration", help="nnU-Net configuration (2d)")
    nn_train.add_argument("fold", help="fold 0-4 or all")
    nn_train.add_argument("--config", help="recipe name or YAML config (model/lora/train) for the generic trainer")
    nn_train.add_argument("--trainer", default="nnUNetTrainerUperNetViT", help="trainer class name")
    nn_train.set_defaults(func=cmd_nnunet_train)
    return parser


# what an OSError means for the user, by errno (the message names the path)
_OS_ERROR_HINTS = {
    errno.ENOSPC: "no space left on the device; free some space or write somewhere else",
    errno.EDQUOT: "the disk quota is exceeded; free some space or write somewhere else",
    errno.EFBIG: "the file is too large for this file system (FAT32 stops at 4 GB) or for the process's file-size "
                 "limit (ulimit -f); write to another file system or raise the limit",
    errno.EROFS: "the file system is read-only; choose a writable folder",
    errno.EACCES: "permission denied; choose a folder you can write to (or fix its permissions)",
    errno.EPERM: "operation not permitted; choose a folder you can write to",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
    errno.EEXIST: "this path exists and is a file, not a folder",
    errno.EISDIR: "this path is a folder, not a file",
    errno.ENOENT: "no such file or folder",
}

# input and usage errors exit with 2 (argparse's code); anything else, e.g. a full disk, with 1
_USAGE_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, IsADirectoryError)


def describe_error(err: BaseException) -> str:
    """One line for the user: the path and the cause for disk errors, the message for ours, the type too
    for anything unexpected."""
    if isinstance(err, OSError) and err.errno in _OS_ERROR_HINTS and err.filename is not None:
        text = f"{os.fsdecode(err.filename)!r}: {_OS_ERROR_HINTS[err.errno]} ({err.strerror})"
    elif isinstance(err, (ValueError, OSError)):
        text = str(err) or type(err).__name__
    else:
        text = f"{type(err).__name__}: {err}"
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _log_to_run_files(line: str, trace: str) -> None:
    """The error, with its traceback, into the log files (``train.log``) the command opened."""
    for handler in _package_logger().handlers:
        if isinstance(handler, logging.FileHandler) and handler.get_name() == CLI_HANDLER:
            record = logging.makeLogRecord({"msg": f"{line}\n{trace}", "levelno": logging.ERROR, "levelname": "ERROR"})
            handler.handle(record)
            handler.flush()


def main(argv: Optional[List[str]] = None) -> int:
    """Run a command; a failure ends with one line ``upernet-vit CMD: error: ...`` on stderr (the traceback
    too with ``--debug``, and always in the run's ``train.log``) and exit code 2 (bad input) or 1."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and args.func is not cmd_nnunet_train:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        if args.func is cmd_nnunet_train:
            return cmd_nnunet_train(args, extra)
        return args.func(args)
    except KeyboardInterrupt:
        print(f"upernet-vit {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        from .config import ConfigError

        message = describe_error(err)
        if not isinstance(err, ConfigError):  # a config error names YAML keys (train.output_dir), not parameters
            message = _with_flags(message, FLAGS.get(args.command, {}))  # the user's flags, not parameters
        line = f"upernet-vit {args.command}: error: {message}"
        _log_to_run_files(line, traceback.format_exc())
        if args.debug:
            traceback.print_exc()
        print(line, file=sys.stderr)
        return 2 if isinstance(err, _USAGE_ERRORS) else 1
