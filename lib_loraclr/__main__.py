from lib_loraclr.cli import main

raise SystemExit(main())
