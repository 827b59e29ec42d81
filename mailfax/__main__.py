from mailfax.cli import main

raise SystemExit(main())
