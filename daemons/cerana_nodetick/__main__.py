from cerana_nodetick.cli import main

raise SystemExit(main())
