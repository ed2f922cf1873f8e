"""`python -m gptq_plugins`, as `torchrun -m gptq_plugins quantize ...` launches each rank."""

import sys

from gptq_plugins.cli import main

sys.exit(main())
