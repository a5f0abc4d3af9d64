"""``minillm COMMAND MODEL ...``: one command for pruning, evaluation, recovery and export.

``minillm prune`` is ``python -m minillm.prune``, and so on: each command's module holds its
arguments and ``main``; this module dispatches to them and holds what they share (the parser
style, logging to stderr, ``--quiet``, one-line errors).
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = {
    "prune": "remove attention heads and MLP channels; save the smaller model",
    "eval": "perplexity, zero-shot accuracy, samples and speed of a model",
    "recover": "LoRA recovery of a pruned model by distillation from the dense one",
    "export": "write a (pruned) LLaMA-family model as a GGUF file for llama.cpp",
}


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Every option's default in ``--help`` (unless unset, off, or already named in its help);
    the description's line breaks kept."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        unset = action.default is None or action.default is False
        unset = unset or action.default == argparse.SUPPRESS
        if unset or not action.option_strings or "default" in text:
            return text
        return f"{text} (default: %(default)s)".lstrip()


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=HelpFormatter
    )


def setup_logging(quiet: bool) -> None:
    """Logs to stderr; under ``quiet`` only warnings, and no transformers progress bars."""
    logging.basicConfig(
        level=logging.WARNING if quiet else logging.INFO, format="%(message)s", stream=sys.stderr
    )
    if quiet:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()


def environment_error(prog: str) -> bool:
    """Print what keeps the dependencies from importing (one line) and return True, if any."""
    from minillm.environment import problem

    message = problem()
    if message is not None:
        print(f"{prog}: error: {message}", file=sys.stderr)
    return message is not None


def fail(prog: str, err: Exception) -> int:
    """Print ``err`` as one line (``prog: error: ...``); exit status 2."""
    print(f"{prog}: error: {str(err).splitlines()[0]}", file=sys.stderr)
    return 2


def usage() -> str:
    width = max(map(len, COMMANDS))
    rows = "\n".join(f"  {name:<{width}}  {text}" for name, text in COMMANDS.items())
    return (
        "usage: minillm COMMAND [MODEL] [options]\n\ncommands:\n"
        f"{rows}\n\n'minillm COMMAND --help' lists a command's options and their defaults."
    )


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else 2
    if argv[0] == "--version":
        from minillm import __version__

        print(f"minillm {__version__}")
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(
            f"minillm: error: unknown command '{command}'; choose from {', '.join(COMMANDS)}",
            file=sys.stderr,
        )
        return 2
    module = importlib.import_module(f"minillm.{command}")
    return module.main(rest, prog=f"minillm {command}")


if __name__ == "__main__":
    sys.exit(main())
