"""A model module for tests: importing it leaves a mark, so a test can show it was never imported."""

import os

os.environ["CONSORTIUM_TEST_MARKER_IMPORTED"] = "1"


def factory(input_shape, num_classes):  # pragma: no cover - must never run at a site
    raise AssertionError("a site imported and called code the server named")
