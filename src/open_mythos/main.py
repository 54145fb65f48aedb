"""Re-exports for the OpenMythos quickstart: ``from open_mythos.main import OpenMythos, MythosConfig``."""

from .config import MythosConfig
from .model import OpenMythos

__all__ = ["MythosConfig", "OpenMythos"]
