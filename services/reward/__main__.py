from services.reward.main import main

raise SystemExit(main())
