"""pallas_kernels.platform.resolve_backend: the choice every kernel wrapper makes."""

import pytest

from pallas_kernels import platform


def test_explicit_backends_run_when_eligible_and_fall_back_to_xla_otherwise():
    assert platform.resolve_backend("interpret", True) == "interpret"
    assert platform.resolve_backend("pallas", True) == "pallas"
    assert platform.resolve_backend("interpret", False) == "xla"  # e.g. float32 x: no kernel for it
    with pytest.raises(ValueError, match="backend='cuda'"):
        platform.resolve_backend("cuda", True)


@pytest.mark.parametrize("device, eligible, pays, want", [
    ("gpu", True, True, "pallas"), ("gpu", True, False, "xla"), ("gpu", False, True, "xla"),
    ("cpu", True, True, "xla"),
])
def test_default_picks_the_kernel_on_gpus_only_where_it_pays(monkeypatch, device, eligible, pays, want):
    monkeypatch.setattr(platform.jax, "default_backend", lambda: device)
    assert platform.resolve_backend(None, eligible, kernel_pays=pays) == want
