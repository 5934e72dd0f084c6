from services.reference.main import main

raise SystemExit(main())
