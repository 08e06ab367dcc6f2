"""The command line, ``python -m hessspec.run``: config in, run folder out."""
