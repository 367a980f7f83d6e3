"""``python -m nnsight_magic.kernel install [--user | --sys-prefix | --prefix DIR] [--name NAME]``.

In [1]: !python -m nnsight_magic.kernel install --user
Installed kernelspec nnsight in /home/me/.local/share/jupyter/kernels/nnsight
"""

from __future__ import annotations

import argparse
import sys

from . import DEFAULT_NAME, install


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nnsight_magic.kernel",
                                     description="Install a Jupyter kernel that preloads nnsight_magic.")
    commands = parser.add_subparsers(dest="command", required=True)
    installing = commands.add_parser("install", help="install the kernelspec")
    installing.add_argument("--name", default=DEFAULT_NAME, help=f"kernel name (default: {DEFAULT_NAME})")
    installing.add_argument("--display-name", help="name shown by front ends")
    where = installing.add_mutually_exclusive_group()
    where.add_argument("--user", action="store_true", help="install for the current user")
    where.add_argument("--sys-prefix", action="store_true", help=f"install into this environment ({sys.prefix})")
    where.add_argument("--prefix", help="install under PREFIX/share/jupyter/kernels")
    args = parser.parse_args(argv)
    prefix = sys.prefix if args.sys_prefix else args.prefix
    path = install(args.name, user=args.user, prefix=prefix, display_name=args.display_name)
    print(f"Installed kernelspec {args.name} in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
