from radfed.cli import main

raise SystemExit(main())
