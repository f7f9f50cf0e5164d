"""``python -m medusa_kernels.tree COMMAND ...``: tree tools. Without a command: this help."""

from __future__ import annotations

import sys

PROG = "python -m medusa_kernels.tree"
COMMANDS = {
    "calibrate": "grow a tree from the heads' measured top-k accuracies\n"
                 "             (--nodes auto: its size timed fastest on this device;\n"
                 "              --nodes auto --batches 1,2,4,...: a tree policy table)",
}
HELP = f"""usage: {PROG} COMMAND [options]

Medusa candidate trees (medusa_kernels.tree). Commands:
""" + "".join(f"  {name:10s} {text}\n" for name, text in COMMANDS.items()) + f"""
{PROG} COMMAND --help shows a command's options, e.g.
  {PROG} calibrate --model DIR --medusa DIR --prompts FILE \\
      --nodes auto --out tree.json
  {PROG} calibrate --out tree.json   # the demo model, its held-out prompts
  {PROG} calibrate --nodes auto --batches 1,2,4,8,16,32,64 \\
      --out tree_policy_cpu.json   # the tree per batch size
"""


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, end="")
        return 0
    if argv[0] not in COMMANDS:
        print(f"{PROG}: error: unknown command {argv[0]!r}; choose from {sorted(COMMANDS)}",
              file=sys.stderr)
        return 2
    from ..calibrate import main as calibrate

    return calibrate(argv[1:])


if __name__ == "__main__":
    sys.exit(main())
