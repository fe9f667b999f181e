from cerana_dataserver.cli import main

raise SystemExit(main())
