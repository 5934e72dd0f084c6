from services.learner.main import main

raise SystemExit(main())
