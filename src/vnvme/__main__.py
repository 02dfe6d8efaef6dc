from vnvme.cli import main

raise SystemExit(main())
