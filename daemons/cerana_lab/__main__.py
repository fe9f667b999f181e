from cerana_lab.cli import main

raise SystemExit(main())
