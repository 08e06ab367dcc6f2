"""``python -m hessspec.run``: the command line. The code lives in :mod:`hessspec.cli`."""

from hessspec.cli.main import main, run_as_command

__all__ = ["main", "run_as_command"]

if __name__ == "__main__":
    run_as_command()
