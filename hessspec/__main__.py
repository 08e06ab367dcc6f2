"""``python -m hessspec``: the same command line as ``python -m hessspec.run``."""

from hessspec.run import main

raise SystemExit(main())
