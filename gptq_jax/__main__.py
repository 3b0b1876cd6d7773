from gptq_jax.cli import main

raise SystemExit(main())
