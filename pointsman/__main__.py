from pointsman.cli import main

raise SystemExit(main())
