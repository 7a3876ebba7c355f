"""The ``seglens`` command: each subcommand is a thin shell over one public Python function.

Options given on the command line override the YAML ``--config`` file, which overrides the
defaults; an option left out on the command line never overrides anything (so an explicit
``--no-...`` wins over the file, and the file wins over a default).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import logging
import os
import sys
from collections.abc import Callable, Sequence

log = logging.getLogger("seglens")

#: An on/off option that is None when not given, so it never overrides the YAML (``--no-x`` wins).
FLAG = {"action": argparse.BooleanOptionalAction, "default": None}

COMMANDS: dict[str, tuple[Callable[[argparse.ArgumentParser], None], Callable, str]] = {}


def command(name: str, help_text: str):
    """Register ``(add_arguments, run)`` for a subcommand; ``run(args) -> int``."""

    def register(add_arguments):
        def attach(run):
            COMMANDS[name] = (add_arguments, run, help_text)
            return run

        return attach

    return register


class LazyHelp:
    """An option's help text, built (once) when argparse prints the help.

    The registries and recipes the texts come from live in modules that import torch and
    transformers; building the text only when it is printed keeps the parser (and every
    ``seglens ... --help``) from waiting for them, and a registry's names never go stale in it.
    """

    def __init__(self, render: Callable[[], str]):
        self._render = render
        self._text: str | None = None

    def __str__(self) -> str:
        if self._text is None:
            self._text = self._render()
        return self._text

    # argparse treats a help text as a str: ``help % params``, ``"%" in help``, ``help.strip()``,
    # ``help + " (default: ...)"`` (ArgumentDefaultsHelpFormatter); each builds the text first.
    def __mod__(self, params) -> str:
        return str(self) % params

    def __contains__(self, part: str) -> bool:
        return part in str(self)

    def __add__(self, other: str) -> str:
        return str(self) + other

    def __len__(self) -> int:
        return len(str(self))

    def __getattr__(self, name: str):
        if name.startswith("_"):  # never for _render / _text (copy and pickle probe these)
            raise AttributeError(name)
        return getattr(str(self), name)


def _model_help() -> str:
    from seglens.models.loading import NAMED_MODELS, TINY_MODELS

    names = ", ".join([*NAMED_MODELS, *sorted(TINY_MODELS)])
    return f"a registered model ({names}), a hub id or a local checkpoint folder"


def _dataset_help() -> str:
    from seglens.data.datasets import DATASETS, GENERATED

    generated = [name for name, cls in DATASETS.items() if cls in GENERATED]
    return (
        f"{', '.join(DATASETS)} (README: layouts; {' and '.join(generated)} are generated and "
        "take no --data-root)"
    )


def add_run_options(parser: argparse.ArgumentParser) -> None:
    """Options shared by everything that runs a model on a dataset (default None = not given)."""
    parser.add_argument("--config", help="YAML config file (CLI options override it)")
    parser.add_argument(
        "--model",
        dest="model.name",
        help=LazyHelp(_model_help),
    )
    parser.add_argument("--dtype", dest="model.dtype", help="auto, float32, bfloat16, float16")
    parser.add_argument("--device", dest="model.device", help="cuda, cuda:1, cpu")
    parser.add_argument("--device-map", dest="model.device_map", help="e.g. auto")
    parser.add_argument("--attn", dest="model.attn_implementation", choices=["sdpa", "eager"])
    parser.add_argument("--geometry", dest="model.geometry", choices=["pad", "crop", "resize"])
    parser.add_argument(
        "--trust-remote-code",
        dest="model.trust_remote_code",
        **FLAG,
    )
    parser.add_argument(
        "--dataset",
        dest="data.dataset",
        help=LazyHelp(_dataset_help),
    )
    parser.add_argument(
        "--data-root",
        dest="data.root",
        help="dataset root folder (hf: also one .parquet file); an archive must be extracted first",
    )
    parser.add_argument(
        "--folder-val-fraction",
        dest="data.folder_val_fraction",
        type=float,
        help="flat folder dataset: share of its images in the seeded val part (default 0.2)",
    )
    parser.add_argument("--hf-image-column", dest="data.hf_image_column", help="hf: image column")
    parser.add_argument(
        "--hf-label-column",
        dest="data.hf_label_column",
        help="hf: label-map column (default: annotation, mask or label)",
    )
    parser.add_argument(
        "--hf-reduce-zero-label",
        dest="data.hf_reduce_zero_label",
        **FLAG,
        help="hf: ADE20K-style labels (raw 0 = other -> ignore, raw k -> class k-1)",
    )
    parser.add_argument(
        "--hf-classes",
        dest="data.hf_classes",
        help="hf: class names, a classes.txt file or ade20k, voc, cityscapes, coco-stuff",
    )
    parser.add_argument("--train-split", dest="data.train_split")
    parser.add_argument("--eval-split", dest="data.eval_split")
    parser.add_argument(
        "--limit",
        dest="data.limit_train",
        type=int,
        help="use only the first N images of each split",
    )
    parser.add_argument("--limit-eval", dest="data.limit_eval", type=int)
    parser.add_argument("--batch-size", dest="data.batch_size", type=int)
    parser.add_argument("--num-workers", dest="data.num_workers", type=int)
    parser.add_argument("--on-bad-sample", dest="data.on_bad_sample", choices=["error", "skip"])
    parser.add_argument("--seed", dest="seed", type=int)
    parser.add_argument("--out", dest="out", help="run directory")
    parser.add_argument(
        "--overwrite",
        dest="overwrite",
        **FLAG,
        help="replace an existing run directory",
    )
    parser.add_argument(
        "--resume",
        dest="resume",
        **FLAG,
        help="continue a killed run from RUN/checkpoint (ends with the same results)",
    )
    parser.add_argument(
        "--checkpoint-every",
        dest="checkpoint_every",
        type=int,
        help="checkpoint every N batches (default 50; 0: at the end of each phase only)",
    )


def resolve_config(args: argparse.Namespace):
    """Defaults < ``--config`` YAML < options given on the command line."""
    from seglens.config import load_config

    overrides = {
        k: v
        for k, v in vars(args).items()
        if "." in k or k in ("seed", "out", "overwrite", "resume", "checkpoint_every")
    }
    # --limit applies to both splits unless --limit-eval says otherwise.
    if overrides.get("data.limit_train") is not None and overrides.get("data.limit_eval") is None:
        overrides["data.limit_eval"] = overrides["data.limit_train"]
    return load_config(getattr(args, "config", None), **overrides)


# --- entry point ------------------------------------------------------------------------------
def _load_commands() -> None:
    """Import every module of ``seglens.commands``; each registers its subcommands (the
    analyses' own subcommands come from the registry)."""
    import importlib
    import pkgutil

    import seglens.commands

    for info in pkgutil.iter_modules(seglens.commands.__path__):
        importlib.import_module(f"seglens.commands.{info.name}")


def _load_analysis_commands() -> None:
    """Register the subcommand of every registered analysis (``seglens.analyses``)."""
    from seglens.analyses import ordered

    for analysis in ordered():
        if analysis.command is not None and analysis.command.name not in COMMANDS:
            cmd = analysis.command
            COMMANDS[cmd.name] = (cmd.add_arguments, cmd.main, cmd.help)


def build_parser() -> argparse.ArgumentParser:
    _load_commands()
    _load_analysis_commands()
    parser = argparse.ArgumentParser(
        prog="seglens",
        description="Where in a multimodal LLM does per-pixel semantic information live?",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add_arguments, run, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        add_arguments(p)
        p.set_defaults(_run=run)
    return parser


def user_error(error: BaseException) -> str | None:
    """The one-line message of an error a user can fix (None for a bug: show the traceback).

    Refusals and bad input (``ValueError``, missing or existing files, a run in use) keep their
    message; a full disk, a read-only or forbidden ``--out`` and other failed file operations
    name the file and what to do.
    """
    import errno

    from seglens.rundir.lock import RunInUseError

    if isinstance(error, ValueError | FileNotFoundError | FileExistsError | RunInUseError):
        return str(error)
    if not isinstance(error, OSError):
        return None
    where = error.filename or "a file"
    if error.errno == errno.ENOSPC or error.errno == errno.EDQUOT:
        return (
            f"no space left on the device writing {where}: free space or choose another --out. "
            "Every file is replaced whole or not at all, so nothing written is corrupt; run the "
            "same command with --resume to continue from the last checkpoint"
        )
    if isinstance(error, PermissionError) or error.errno == errno.EROFS:
        return (
            f"cannot write {where}: {error.strerror or 'permission denied'}; choose an --out "
            "you can write to (or fix the folder's permissions)"
        )
    return f"{where}: {error.strerror or error}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; return the exit status.

    An error a user can fix (``user_error``) prints one line naming the file or value, the
    cause and the fix, and returns 2 (``-v`` shows the traceback instead); Ctrl-C says how to
    continue and returns 130. Run-directory locks are released when the command ends.
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    from seglens import distributed
    from seglens.rundir import lock

    if int(os.environ.get("RANK", "0")) > 0:  # torchrun: rank 0 speaks for all
        logging.getLogger().setLevel(logging.WARNING)
    where = ""
    try:
        with distributed.process_group():
            rank, world = distributed.rank_world()
            where = f" (rank {rank} of {world})" if world > 1 else ""
            quiet = contextlib.redirect_stdout(io.StringIO()) if rank else contextlib.nullcontext()
            with quiet:
                return int(args._run(args) or 0)
    except KeyboardInterrupt:
        if args.verbose:
            raise
        again = "Run the same command again"
        if hasattr(args, "resume"):  # commands that run a model into --out checkpoint it
            again += " with --resume to continue from the last checkpoint"
        print(
            f"seglens {args.command}: interrupted{where}; every file it wrote is whole (files "
            f"are replaced whole or not at all). {again}",
            file=sys.stderr,
        )
        return 130
    except Exception as e:
        message = user_error(e)
        if message is not None and not args.verbose:
            one_line = " ".join(message.split())
            print(f"seglens {args.command}: error{where}: {one_line}", file=sys.stderr)
            return 2
        if isinstance(e, RuntimeError) and where and not args.verbose:
            # Usually a collective broken by a peer that failed first and printed its own error.
            print(f"seglens {args.command}: stopped{where}: {e}", file=sys.stderr)
            return 1
        raise
    finally:
        lock.release_all()
