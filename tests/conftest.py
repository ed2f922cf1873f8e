import os

# Nothing may come from a model hub: a stray lookup fails fast instead of hanging.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _interpret_triton_standard_library() -> None:
    """Without a GPU, Triton kernels are tested in its interpreter (tests/test_kernels.py).

    The interpreter mode is fixed when `triton.language` is first imported (its own @triton.jit
    helpers), and transformers/vLLM may import it early in a test session, so import it here
    under TRITON_INTERPRET=1 first. The variable is then removed again so that subprocesses
    (vLLM engines) start as they would for a user.
    """
    import importlib.util

    import torch

    if torch.cuda.is_available() or importlib.util.find_spec("triton") is None:
        return
    previous = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        import triton.language  # noqa: F401
    finally:
        if previous is None:
            del os.environ["TRITON_INTERPRET"]
        else:
            os.environ["TRITON_INTERPRET"] = previous


_interpret_triton_standard_library()
