import pytest


@pytest.fixture
def kernels(request, monkeypatch):
    """``"on"``: the compiled CPU kernels; ``"off"``: what runs without them (the torch ops CUDA runs,
    pyarrow's CSV split in the N-Triples converter), as with NVKG_NATIVE=0. Parametrise a test with
    ``@pytest.mark.parametrize("kernels", ["on", "off"], indirect=True)``."""
    from sharding.kernels import native

    native.library.cache_clear()
    if request.param == "off":
        monkeypatch.setenv("NVKG_NATIVE", "0")
    yield request.param
    native.library.cache_clear()
