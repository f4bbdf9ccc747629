from mode_fast.cli import main

raise SystemExit(main())
