"""``python -m hessspec``: the same command line as ``python -m hessspec.run``."""

from hessspec.cli.main import run_as_command

run_as_command()
