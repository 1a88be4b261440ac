"""The version of plaid-engine: read by the package metadata (pyproject.toml) and the code alike."""
__version__ = "0.2.0"
