"""Without a GPU, Triton kernels run in Triton's CPU interpreter (set before any triton import)."""

import os

import pytest
import torch

if "TRITON_INTERPRET" not in os.environ and not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture
def device() -> torch.device:
    """Where Triton kernels run in this suite: CPU under the interpreter, else the GPU."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    pytest.skip("triton kernels need TRITON_INTERPRET=1 or a GPU")


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A private smile cache holding the embedded corpus and a small tokenizer, built once."""
    from smile.data import DataConfig, build_tokenizer
    from smile.data.embedded import embedded_documents

    path = str(tmp_path_factory.mktemp("smile-cache"))
    embedded_documents(None, path)
    build_tokenizer(DataConfig(cache_dir=path, vocab_size=1024, tokenizer_train_docs=300))
    return path
