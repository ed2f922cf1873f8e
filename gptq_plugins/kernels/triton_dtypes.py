"""The activation dtypes the Triton kernels compute in.

Apart from the kernels because the backend chooses with them before Triton is imported (CPU-only
installs never import it), and the kernels must not import their backend.
"""

import torch

ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)
