"""minillm export MODEL --out FILE.gguf (also python -m minillm.export): write a LLaMA-family
model, dense or pruned by minillm, as a GGUF file for llama.cpp.

Every layer the same sizes: llama.cpp's llama graph; per-layer sizes: its deci graph (see
minillm/model/gguf_export.py). The file is written to a temporary sibling and renamed when
complete. Prints a JSON summary on stdout.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from minillm import cli

OUTTYPES = ("f32", "f16", "q8_0")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "model", metavar="MODEL", help="model directory (minillm output or LLaMA family)"
    )
    p.add_argument("--out", required=True, metavar="FILE.gguf", help="GGUF file to write")
    p.add_argument("--outtype", default="f32", choices=OUTTYPES, help="tensor type")
    p.add_argument("--overwrite", action="store_true", help="replace an existing FILE.gguf")
    p.add_argument(
        "--tokenizer-pre", help="llama.cpp pre-tokenizer name (default: read from tokenizer.json)"
    )
    p.add_argument("--quiet", action="store_true", help="no logs or progress bars")


def main(argv: list[str] | None = None, prog: str = "python -m minillm.export") -> int:
    p = cli.parser(prog, __doc__)
    add_arguments(p)
    args = p.parse_args(argv)
    if cli.environment_error(prog):
        return 2
    cli.setup_logging(args.quiet)
    logging.getLogger("gguf").setLevel(logging.WARNING)
    from minillm.model.gguf_export import export_gguf

    try:
        result = export_gguf(
            args.model, args.out, args.outtype, args.overwrite, args.tokenizer_pre, not args.quiet
        )
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        return cli.fail(prog, err)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
