import sys

from stackwise_jax.cli import main

sys.exit(main())
