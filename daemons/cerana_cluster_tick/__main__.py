from cerana_cluster_tick.cli import main

raise SystemExit(main())
