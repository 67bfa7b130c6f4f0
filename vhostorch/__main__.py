from vhostorch.cli import main

raise SystemExit(main())
