#!/usr/bin/env python
"""Train from gin files, T5X style.

  python scripts/train.py --gin_file=gin/runs/tiny_cpu.gin --gin.MODEL_DIR='"/tmp/run"' \
      [--gin_file=...]... [--gin.NAME=VALUE]...

--gin_file is repeatable and resolved against --gin_search_path (default: the project's gin/ folder);
each --gin.NAME=VALUE is one gin binding (VALUE in gin syntax: strings quoted).
"""

import argparse
import logging
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def parse_flags(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gin_file", action="append", default=[], help="repeatable")
    parser.add_argument("--gin_search_path", action="append", default=[], help="repeatable")
    args, rest = parser.parse_known_args(argv)
    bindings = []
    for item in rest:
        if not item.startswith("--gin.") or "=" not in item:
            parser.error(f"unrecognised argument {item!r} (expected --gin_file=..., --gin.NAME=VALUE)")
        bindings.append(item[len("--gin.") :])
    if not args.gin_file:
        parser.error("at least one --gin_file is required (e.g. gin/runs/tiny_cpu.gin)")
    return args, bindings


def main(argv=None) -> int:
    args, bindings = parse_flags(sys.argv[1:] if argv is None else argv)
    import gin

    # Import every module with gin configurables before parsing: gin locks its registry afterwards.
    import meditron_jax.data.pipeline  # noqa: F401
    import meditron_jax.data.tasks  # noqa: F401
    from meditron_jax.train import trainer

    for path in args.gin_search_path + [os.path.join(ROOT, "gin"), ROOT]:
        gin.add_config_file_search_path(path)
    try:
        gin.parse_config_files_and_bindings(args.gin_file, bindings)
    except (ValueError, OSError) as e:
        raise SystemExit(f"gin configuration error: {e}") from e
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    metrics = trainer.train()
    print(metrics)
    return 0


if __name__ == "__main__":
    sys.exit(main())
