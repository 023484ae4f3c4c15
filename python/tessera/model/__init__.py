"""Models with scvi-tools' interface: setup, construct, train, embed, save and load."""

from ._scanvi import SCANVI
from ._scvi import SCVI

__all__ = ["SCANVI", "SCVI"]
