from fedtext.cli.main import main

raise SystemExit(main())
