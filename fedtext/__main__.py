from fedtext.cli import main

raise SystemExit(main())
