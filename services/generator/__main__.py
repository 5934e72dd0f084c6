from services.generator.main import main

# The guard matters: the vLLM backend spawns engine processes, which re-import this module.
if __name__ == "__main__":
    raise SystemExit(main())
