#!/usr/bin/env python
"""Django's command-line utility for Kurs."""

from __future__ import annotations

import os
import sys


def main() -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "config.settings")
    from config.env import ConfigError

    try:
        import config.settings  # noqa: F401 - parse settings first: one clear line on a bad value
    except ConfigError as exc:
        print(f"kurs: configuration error: {exc}", file=sys.stderr)
        sys.exit(2)

    from django.core.management import execute_from_command_line

    execute_from_command_line(sys.argv)


if __name__ == "__main__":
    main()
