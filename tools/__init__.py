"""Scripts a developer runs by hand (``python -m tools.NAME``); not part of the package."""
