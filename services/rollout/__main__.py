from services.rollout.main import main

raise SystemExit(main())
