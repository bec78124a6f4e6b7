"""``meditron-eval``: meditron_jax/eval/cli.py behind the commands' quiet start-up (TensorFlow, absl and SeqIO
chatter hidden unless --verbose) and one ``error:`` line per user error. See --help and docs/evaluation.md."""

import sys

from meditron_jax.cli.common import quiet_startup, run


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "-h" not in argv and "--help" not in argv:
        quiet_startup("--verbose" in argv)
    from meditron_jax.eval import cli as eval_cli

    return eval_cli.main(argv)


def console(argv=None) -> int:
    return run(main, argv)


if __name__ == "__main__":
    sys.exit(console())
