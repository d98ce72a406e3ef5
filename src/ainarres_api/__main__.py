from ainarres_api.ops.cli import main

raise SystemExit(main())
