import os

import pytest
import torch
from hypothesis import HealthCheck, settings

settings.register_profile(
    "default", max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
settings.register_profile("ci", max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _restore_logging():
    """The CLI's ``main`` adds handlers on the package's logger that write to the stderr of its call
    (pytest's capture, closed after the test): remove them, so later tests do not log into a closed stream."""
    import logging

    from upernet_vit.cli import CLI_HANDLER

    package = logging.getLogger("upernet_vit")
    level = package.level
    yield
    for handler in [h for h in package.handlers if h.get_name() == CLI_HANDLER]:
        package.removeHandler(handler)
        handler.close()
    package.setLevel(level)
