"""Train from gin files, T5X style.

Example (the embedded tiny default; MEDITRON's recipes are gin/runs/pretrain_7b.gin and pretrain_70b.gin):

  meditron-train --gin_file=runs/tiny_cpu.gin --gin.MODEL_DIR="'/tmp/run'" \\
      --gin.curated_data_dir.path="'/tmp/gap_replay'"

--gin_file is repeatable and resolved against --gin_search_path (default: the project's gin/ folder);
each --gin.NAME=VALUE is one gin binding (VALUE in gin syntax: strings quoted). A macro given on the command
line that no binding uses (e.g. a misspelled --gin.TRAIN_STEP=5) is an error.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections.abc import Sequence

from meditron_jax.cli.common import add_verbose, quiet_startup, run


def parse_flags(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[], help="repeatable")
    parser.add_argument("--gin_search_path", action="append", default=[], help="repeatable")
    add_verbose(parser)
    args, rest = parser.parse_known_args(argv)
    bindings = []
    for item in rest:
        if not item.startswith("--gin.") or "=" not in item:
            parser.error(f"unrecognised argument {item!r} (expected --gin_file=..., --gin.NAME=VALUE)")
        bindings.append(item[len("--gin.") :])
    if not args.gin_file:
        parser.error("at least one --gin_file is required (e.g. runs/tiny_cpu.gin)")
    return args, bindings


def unused_macros(config_str: str, bindings: Sequence[str]) -> list[str]:
    """Macros bound by ``bindings`` (``NAME=value``, no dot) that the parsed configuration never references."""
    names = [b.split("=", 1)[0].strip() for b in bindings]
    macros = [n for n in names if re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", n)]
    return [m for m in macros if not re.search(rf"%{re.escape(m)}\b", config_str)]


def main(argv=None) -> int:
    args, bindings = parse_flags(sys.argv[1:] if argv is None else argv)
    quiet_startup(args.verbose)
    import gin

    # Import every module with gin configurables before parsing: gin locks its registry afterwards.
    import meditron_jax.data.pipeline  # noqa: F401
    import meditron_jax.data.tasks  # noqa: F401
    from meditron_jax.resources import gin_dir
    from meditron_jax.train import trainer

    root = gin_dir()
    for path in args.gin_search_path + [str(root), str(root.parent)]:
        gin.add_config_file_search_path(path)
    try:
        gin.parse_config_files_and_bindings(args.gin_file, bindings)
    except (ValueError, OSError) as e:
        raise SystemExit(f"gin configuration error: {e}") from e
    unused = unused_macros(gin.config_str(), bindings)
    if unused:
        raise SystemExit(
            f"gin configuration error: --gin.{unused[0]}=... binds a macro that no gin file uses "
            f"(misspelled? the macros used are the %NAME references in {', '.join(args.gin_file)})"
        )
    metrics = trainer.train()
    print(summary(metrics))
    return 0


def summary(metrics: dict) -> str:
    """The run's last logged step in one line (every step's numbers are in MODEL_DIR/metrics.jsonl)."""
    if "loss" not in metrics:
        return "training finished; this invocation logged no step (see MODEL_DIR/metrics.jsonl)"
    line = f"training: last logged step {metrics['step']}, loss {metrics['loss']:.4f}"
    if "tokens_per_s" in metrics:
        line += f", {metrics['tokens_per_s']:,.0f} tokens/s"
    if metrics.get("preempted"):
        line += " (preempted: run the same command again to resume)"
    return line


def console(argv=None) -> int:
    return run(main, argv)


if __name__ == "__main__":
    sys.exit(console())
