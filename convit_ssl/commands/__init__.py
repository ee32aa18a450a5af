"""Subcommands of ``convit-ssl``: each module has ``add_arguments(parser)`` and ``run(args)``."""
