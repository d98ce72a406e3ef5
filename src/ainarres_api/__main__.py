from ainarres_api.cli import main

raise SystemExit(main())
